"""Every method: known answers on constructed statistics (pure), then one matrix over
method x allocation x family on tiny models (budget exact, floors, save/reload equal logits)."""

import pytest
import torch

from factories import CORE_FAMILIES, random_token_batches, tiny_model
from helpers import logits, logits_of_many_in_one_process
from optimum_grape import GrapeConfig, GrapeConfigError, GrapePruner
from optimum_grape.algorithms.selection import best_subset, route
from optimum_grape.methods import METHODS
from optimum_grape.stats import ExpertStats, LayerStats

ROUTING = {"top_k": 2, "scoring": "softmax", "norm_topk_prob": True}


def synthetic_stats(layers=4, experts=8, hidden=6, hot_layer=2, seed=0, tokens=64) -> ExpertStats:
    """Statistics with planted structure: in `hot_layer`, experts 0-5 produce the same outputs."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for l in range(layers):
        outputs = torch.randn(experts, tokens, hidden, generator=gen)
        if l == hot_layer:
            outputs[1:6] = outputs[0] + 0.01 * torch.randn(5, tokens, hidden, generator=gen)
        logits = torch.randn(tokens, experts, generator=gen)
        flat = outputs.flatten(1)
        unit = torch.nn.functional.normalize(flat, dim=-1)
        out[l] = LayerStats(
            num_experts=experts, floor=2, routing=ROUTING,
            router_weight=torch.randn(experts, hidden, generator=gen, dtype=torch.float64),
            tokens=torch.rand(experts, generator=gen, dtype=torch.float64) * 100 + 1,
            weight_mass=torch.rand(experts, generator=gen, dtype=torch.float64) * 50 + 1,
            saliency=torch.rand(experts, generator=gen, dtype=torch.float64) + 0.1,
            similarity=(unit @ unit.T).double(), mean_output=outputs.mean(1).double(),
            router_logits=logits, expert_outputs=outputs)
    return ExpertStats(layers=out, metadata={})


def plan_for(method, stats=None, **kwargs):
    kwargs.setdefault("num_experts_to_prune", 4)
    pruner = GrapePruner(GrapeConfig(method=method, **kwargs))
    return pruner.plan(stats or synthetic_stats())


def kept(plan, layer):
    return sorted(c[0] for c in plan.clusters[layer])


def test_frequency_drops_the_never_routed_expert():
    stats = synthetic_stats()
    stats.layers[1].tokens[5] = 0.0
    plan = plan_for("frequency", stats, num_experts_to_prune=1, allocation="global")
    assert kept(plan, 1) == [0, 1, 2, 3, 4, 6, 7] and plan.experts_per_layer[0] == 8
    uniform = plan_for("frequency", stats, num_experts_to_prune=4)
    assert 5 not in kept(uniform, 1)


def test_reap_drops_the_lowest_saliency():
    stats = synthetic_stats()
    for l in stats.layers:
        stats.layers[l].saliency = torch.arange(8, 0, -1, dtype=torch.float64)  # expert 7 lowest
    plan = plan_for("reap", stats, num_experts_to_prune=4)
    assert all(kept(plan, l) == list(range(7)) for l in range(4))


def test_drop_methods_drop_and_merge_variant_averages():
    dropped = plan_for("frequency")
    assert all(w == [1.0] + [0.0] * (len(w) - 1) for ws in dropped.merge_weights.values() for w in ws)
    merged = plan_for("frequency", merge="weighted")
    assert any(len([x for x in w if x > 0]) > 1 for ws in merged.merge_weights.values() for w in ws)


@pytest.mark.parametrize("method", ["grape", "cprune"])
def test_redundancy_aware_methods_cut_the_planted_layer(method):
    extra = {"method_kwargs": {"layer_fraction": 0.0}} if method == "cprune" else {"preset": "paper"}
    plan = plan_for(method, num_experts_to_prune=3, **extra)
    assert plan.experts_per_layer == {0: 8, 1: 8, 2: 5, 3: 8}
    assert all(set(c) <= set(range(6)) for c in plan.clusters[2] if len(c) > 1)


def test_cprune_two_stages_and_affinity_weights():
    plan = plan_for("cprune", num_experts_to_prune=8)
    meta = plan.metadata["cprune"]
    assert meta["layer_budget"] == 4 and meta["global_budget"] == 4 and plan.router == "mean"
    assert plan.experts_per_layer == {0: 7, 1: 7, 2: 3, 3: 7}  # 1 per layer, then the global stage -> planted layer
    for l, clusters in plan.clusters.items():
        for members, w, r in zip(clusters, plan.merge_weights[l], plan.router_weights[l]):
            assert sum(w) == pytest.approx(1.0) and r == pytest.approx([1 / len(members)] * len(members))


def test_enumerate_finds_the_exact_best_subset():
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(4, 30, 5, generator=gen)
    logits = torch.randn(30, 4, generator=gen)
    logits[:, 3] = -10.0  # expert 3 is never anyone's top-1: removing it changes nothing
    subset, err = best_subset(outputs, logits, {"top_k": 1, "scoring": "softmax", "norm_topk_prob": True}, 3)
    assert subset == [0, 1, 2] and err == pytest.approx(0.0, abs=1e-12)
    # exhaustive = brute force on a top-2 case
    import itertools
    spec = ROUTING
    full = torch.einsum("te,eth->th", route(logits, spec), outputs.double())
    errors = {s: float(((torch.einsum("te,eth->th", route(logits, spec, list(s)), outputs.double()) - full) ** 2)
                       .sum(-1).mean()) for s in itertools.combinations(range(4), 2)}
    assert tuple(best_subset(outputs, logits, spec, 2)[0]) == min(errors, key=errors.get)


def test_enumerate_refuses_too_many_subsets_before_calibration():
    model = tiny_model("mixtral", experts=8)
    pruner = GrapePruner(GrapeConfig(method="enumerate", pruning_ratio=0.5, method_kwargs={"max_subsets": 10}))
    with pytest.raises(GrapeConfigError, match="max_subsets=10"):
        pruner.calibrate(model, [])


def test_random_is_seeded():
    a, b, c = (plan_for("random", seed=s, num_experts_to_prune=8) for s in (1, 1, 2))
    assert a.clusters == b.clusters and a.clusters != c.clusters


def test_router_merge_joins_experts_to_their_router_twin():
    stats = synthetic_stats()
    st = stats.layers[0]
    st.router_logits[:, 7] = st.router_logits[:, 2] * 1.01
    st.tokens[:] = torch.tensor([90, 80, 70, 60, 50, 40, 30, 1], dtype=torch.float64)
    plan = plan_for("router_merge", stats, num_experts_to_prune=4)
    assert [2, 7] in [sorted(c) for c in plan.clusters[0]]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_every_method_honours_budget_and_floors(method, allocation):
    if allocation not in METHODS[method].allocations:
        with pytest.raises(GrapeConfigError, match="does not apply"):
            GrapeConfig(method=method, allocation=allocation, num_experts_to_prune=4)
        return
    for budget in (1, 5, 12, 24):
        plan = plan_for(method, num_experts_to_prune=budget, allocation=allocation,
                        method_kwargs={"max_subsets": 100000} if method == "enumerate" else {})
        assert plan.num_removed == budget
        assert min(plan.experts_per_layer.values()) >= 2


def test_calibration_records_only_what_the_method_needs():
    model = tiny_model("mixtral")
    batches = random_token_batches()
    cheap = GrapePruner(GrapeConfig(method="frequency", pruning_ratio=0.25, num_samples=8, sequence_length=32))
    stats = cheap.calibrate(model, batches)
    assert all(s.similarity is None and s.expert_outputs is None and s.router_logits is None
               for s in stats.layers.values())
    rich = GrapePruner(GrapeConfig(method="router_merge", pruning_ratio=0.25, num_samples=8, sequence_length=32))
    stats = rich.calibrate(model, batches)
    assert all(s.router_logits is not None and s.similarity is None for s in stats.layers.values())
    with pytest.raises(Exception, match="recalibrate"):
        GrapePruner(GrapeConfig(pruning_ratio=0.25)).plan(stats)


MATRIX = [(m, a) for m in sorted(METHODS) for a in ("global", "uniform") if a in METHODS[m].allocations]


@pytest.fixture(scope="module")
def matrix_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    results = []
    for family in CORE_FAMILIES:
        batches = random_token_batches(n=8, length=32)
        for method, allocation in MATRIX:
            model = tiny_model(family)
            pruner = GrapePruner(GrapeConfig(method=method, allocation=allocation, pruning_ratio=0.25,
                                             num_samples=8, sequence_length=32, max_tokens_per_layer=64))
            pruner.prune(model, batches)
            folder = pruner.save_pretrained(model, root / f"{family}-{method}-{allocation}")
            results.append((family, method, allocation, pruner.last_plan, logits(model), folder))
    reloaded = logits_of_many_in_one_process([r[-1] for r in results])
    return [(*r[:5], again) for r, again in zip(results, reloaded)]


def test_matrix_budget_floors_and_reload(matrix_results):
    assert len(matrix_results) == 3 * len(MATRIX)
    for family, method, allocation, plan, expected, again in matrix_results:
        label = f"{family}/{method}/{allocation}"
        assert plan.num_removed == 8, label
        assert min(plan.experts_per_layer.values()) >= 2, label
        if allocation == "uniform":
            assert set(plan.experts_per_layer.values()) == {6}, label
        assert torch.allclose(again, expected, atol=1e-5), label
