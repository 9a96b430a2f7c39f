"""GRAPE's default preset: the usage-aware merge cost, the layer cap, super-expert protection, the
end-to-end choice among candidate plans, and the 'paper' preset beside it."""

import itertools
import logging
import math

import pytest
import torch

from factories import plant_copies, random_token_batches, tiny_model
from helpers import logits
from optimum_grape import GrapeConfig, GrapeConfigError, GrapePruner, PruningPlan
from optimum_grape.adapters import find_moe_layers
from optimum_grape.algorithms.grape import grape_global_merge
from optimum_grape.algorithms.safeguards import layer_caps, super_experts
from optimum_grape.algorithms.similarity import cost_kernel, relative_merge_cost
from optimum_grape.planning.scoring import score_plans
from optimum_grape.stats import ExpertStats


def random_gates(tokens, experts, top_k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gates = torch.zeros(tokens, experts)
    for t in range(tokens):
        chosen = torch.randperm(experts, generator=gen)[:top_k]
        w = torch.rand(top_k, generator=gen)
        gates[t, chosen] = w / w.sum()
    return gates


# -- the merge cost: pure -------------------------------------------------------------------------
def test_merge_cost_matches_its_definition_token_by_token():
    gen = torch.Generator().manual_seed(0)
    outputs, gates = torch.randn(5, 37, 6, generator=gen), random_gates(37, 5)
    cost = relative_merge_cost(outputs, gates, chunk=8)  # several chunks
    mass = gates.double().sum(0)
    out = outputs.double()
    energy = ((gates.double().T[:, :, None] * out).sum(0) ** 2).sum(-1).mean()
    for i, j in itertools.permutations(range(5), 2):
        w_i = mass[i] / (mass[i] + mass[j])
        err = (gates[:, i].double() * (1 - w_i) - gates[:, j].double() * w_i)[:, None] * (out[i] - out[j])
        assert float(cost[i, j]) == pytest.approx(float((err ** 2).sum(-1).mean() / energy), rel=1e-6)
    assert torch.equal(cost, cost.T) and float(cost.diagonal().abs().max()) == 0.0


def test_merge_cost_knows_usage_and_identity():
    gen = torch.Generator().manual_seed(1)
    outputs = torch.randn(4, 64, 8, generator=gen)
    outputs[1] = outputs[0]  # identical experts: merging them changes nothing
    outputs[3] = outputs[2] + 3.0  # the same distance as 2-3 but ...
    gates = random_gates(64, 4)
    gates[:, 3] *= 0.01  # ... expert 3 is almost never given weight
    cost = relative_merge_cost(outputs, gates)
    assert float(cost[0, 1]) < 1e-12
    rare = relative_merge_cost(outputs, gates)[2, 3]
    gates[:, 3] *= 100
    assert float(rare) < 0.1 * float(relative_merge_cost(outputs, gates)[2, 3])


def test_cost_kernel_gives_positive_similarities():
    sims = {0: -torch.tensor([[0.0, 0.1], [0.1, 0.0]]), 1: -torch.tensor([[0.0, 0.4], [0.4, 0.0]])}
    kernel = cost_kernel(sims)
    assert all(float(k.min()) > 0 and float(k.max()) <= 1 for k in kernel.values())
    assert float(kernel[0][0, 1]) > float(kernel[1][0, 1])


# -- caps and protection: pure ------------------------------------------------------------------
def test_layer_caps_bound_each_layer_but_always_fit_the_uniform_plan():
    num, floors = {l: 8 for l in range(6)}, {l: 2 for l in range(6)}
    assert layer_caps(num, floors, 12, 2.0) == {l: 4 for l in range(6)}
    assert layer_caps(num, floors, 24, 2.0) == {l: 6 for l in range(6)}  # the floor binds first
    assert layer_caps(num, floors, 3, 1.0) == {l: 1 for l in range(6)}  # uniform share never cut
    assert layer_caps(num, floors, 12, None) == {l: 6 for l in range(6)}


def test_global_merge_respects_caps_and_never_merges_protected_experts():
    gen = torch.Generator().manual_seed(0)
    sims = {l: torch.rand(8, 8, generator=gen) for l in range(4)}
    sims[2] = sims[2] + 10  # one layer far more redundant than the rest
    sims = {l: (s + s.T) / 2 for l, s in sims.items()}
    uncapped = grape_global_merge(sims, {l: 2 for l in sims}, 8, 1.0)
    assert len(uncapped.clusters[2]) == 2  # without a cap the redundant layer takes everything
    capped = grape_global_merge(sims, {l: 2 for l in sims}, 8, 1.0, caps={l: 3 for l in sims},
                                protected={2: {0, 5}})
    assert all(len(c) >= 5 for c in capped.clusters.values())
    assert sum(8 - len(c) for c in capped.clusters.values()) == 8
    assert [0] in capped.clusters[2] and [5] in capped.clusters[2]


def test_super_experts_are_the_extreme_outliers_only():
    flat = {l: torch.full((8,), 3.0, dtype=torch.float64) + 0.1 * l for l in range(4)}
    assert super_experts(flat) == {}
    flat[2][5] = 300.0
    assert super_experts(flat) == {2: [5]}


# -- presets ----------------------------------------------------------------------------------------
def test_presets_fill_only_the_fields_left_unset():
    default = GrapeConfig(pruning_ratio=0.25)
    assert (default.similarity, default.entropy_tolerance, default.layer_cap, default.protect_super_experts) == \
        ("merge_cost", "auto", 2.0, True)
    paper = GrapeConfig(pruning_ratio=0.25, preset="paper")
    assert (paper.similarity, paper.entropy_tolerance, paper.layer_cap, paper.protect_super_experts) == \
        ("cka", 0.1, None, False)
    mixed = GrapeConfig(pruning_ratio=0.25, preset="paper", similarity="mse", layer_cap=3.0)
    assert (mixed.similarity, mixed.layer_cap, mixed.entropy_tolerance) == ("mse", 3.0, 0.1)
    assert GrapeConfig.from_dict(default.to_dict()) == default


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "fast"}, "preset='fast'"),
    ({"entropy_tolerance": "sometimes"}, "'auto'"),
    ({"layer_cap": 0.5}, "layer_cap=0.5"),
    ({"protect_super_experts": "yes"}, "True or False"),
    ({"selection_samples": -1}, "selection_samples=-1"),
])
def test_bad_default_knobs_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(GrapeConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GrapeConfig(pruning_ratio=0.25, **kwargs)


# -- the end-to-end choice on tiny models ----------------------------------------------------------
def small(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128, selection_samples=4)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def test_scoring_candidates_leaves_the_model_exactly_as_it_was():
    model = tiny_model("mixtral")
    before = logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = GrapePruner(small(pruning_ratio=0.25))
    plan = pruner.plan(pruner.calibrate(model, random_token_batches(n=12)), model)
    assert len(plan.metadata["candidates"]) >= 2 and plan.metadata["selection"]["metric"]
    assert torch.equal(logits(model), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert sum(l.num_experts for l in find_moe_layers(model)[1]) == 32


def test_layer_sensitivity_is_measured_and_saved(tmp_path):
    model = tiny_model("qwen2_moe")
    pruner = GrapePruner(small(pruning_ratio=0.25))
    stats = pruner.calibrate(model, random_token_batches(n=12))
    assert all(s.sensitivity["kl"] >= 0 and s.sensitivity["merges"] >= 1 for s in stats.layers.values())
    stats.save(tmp_path / "stats.safetensors")
    loaded = ExpertStats.load(tmp_path / "stats.safetensors")
    assert all(loaded.layers[l].sensitivity == s.sensitivity for l, s in stats.layers.items())


def test_default_merges_only_planted_copies_in_their_layer_and_beats_uniform():
    model = tiny_model("mixtral", layers=4, experts=8, seed=3)
    plant_copies(model, layer=2, copies=[0, 1, 2, 3, 4, 5])
    pruner = GrapePruner(small(num_experts_to_prune=3))
    stats = pruner.calibrate(model, random_token_batches(n=16))
    assert abs(float(stats.layers[2].similarity[0, 1])) < 1e-12  # copies: a merge that costs nothing locally
    plan = pruner.plan(stats, model)
    assert plan.experts_per_layer[2] < 8
    assert all(set(c) <= set(range(6)) for c in plan.clusters[2] if len(c) > 1)
    scores = {c["name"]: c["score"] for c in plan.metadata["candidates"]}
    assert scores[plan.metadata["selection"]["chosen"]] <= scores["uniform"]


def test_without_a_model_the_uniform_candidate_is_used_and_said(caplog):
    model = tiny_model("mixtral")
    pruner = GrapePruner(small(pruning_ratio=0.25))
    stats = pruner.calibrate(model, random_token_batches(n=12))
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        plan = pruner.plan(stats)
    assert plan.metadata["selection"]["chosen"] == "uniform" and set(plan.experts_per_layer.values()) == {6}
    assert "not scored" in caplog.text


def test_shipped_model_default_respects_the_cap_and_beats_uniform_on_calibration_kl():
    """The issue's fast check on the embedded model: no layer below what the cap allows, and the chosen
    candidate's held-aside KL never above the uniform candidate's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_grape.cli import default_model_path

    path = default_model_path()
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=16, selection_samples=4))
    plan = pruner.plan(pruner.calibrate(model, None, tok), model)
    caps = plan.metadata["layer_caps"]
    for layer, kept in plan.experts_per_layer.items():
        assert kept >= plan.num_experts_before[layer] - caps[str(layer)]
    scores = {c["name"]: c["score"] for c in plan.metadata["candidates"]}
    chosen = plan.metadata["selection"]["chosen"]
    assert math.isfinite(scores[chosen]) and scores[chosen] <= scores["uniform"]


def test_paper_preset_reproduces_algorithm_1_without_candidates():
    model = tiny_model("mixtral")
    pruner = GrapePruner(small(pruning_ratio=0.25, preset="paper"))
    plan = pruner.plan(pruner.calibrate(model, random_token_batches(n=12)), model)
    assert "candidates" not in plan.metadata and plan.metadata["entropy_tolerance"] == 0.1
    assert plan.metadata["similarity"] == "cka" and plan.metadata["merge_order"]


def test_an_empty_plan_list_scores_nothing():
    assert score_plans(tiny_model("mixtral"), [], [torch.stack(random_token_batches(n=2))]) == []


def test_plan_json_round_trips_candidates():
    model = tiny_model("mixtral")
    pruner = GrapePruner(small(pruning_ratio=0.25))
    plan = pruner.plan(pruner.calibrate(model, random_token_batches(n=12)), model)
    again = PruningPlan.from_json(plan.to_json())
    assert again.metadata["candidates"] == plan.metadata["candidates"]


# -- merging with calibration data (merging/with_data.py) -----------------------------------------------------
def test_keep_all_through_the_data_merger_is_the_identity():
    from optimum_grape.merging.with_data import DataMerger

    model = tiny_model("qwen2_moe")
    before = logits(model)
    _, layers = find_moe_layers(model)
    plan = PruningPlan(clusters={l.index: [[e] for e in range(l.num_experts)] for l in layers},
                       num_experts_before={l.index: l.num_experts for l in layers}, align_neurons=True)
    from optimum_grape.merging.apply import apply_clusters

    apply_clusters(model, plan, DataMerger(model, [torch.stack(random_token_batches(n=4))], refit=True))
    assert torch.equal(logits(model), before)


def test_layer_inputs_are_what_the_experts_receive_with_their_gates():
    from optimum_grape.merging.with_data import layer_inputs

    model = tiny_model("deepseek_v3")
    layer = find_moe_layers(model)[1][0]
    batches = [torch.stack(random_token_batches(n=2, length=16))]
    hidden, gates = layer_inputs(model, layer, batches, max_tokens=20, seed=0)
    assert hidden.shape == (20, model.config.hidden_size) and gates.shape == (20, layer.num_experts)
    assert ((gates > 0).sum(1) == layer.top_k).all()
    assert torch.allclose(logits(model), logits(model))  # the capture hook is gone


@pytest.mark.parametrize("options", [{"refit": True}, {"sequential": True}, {"merge": "saliency"},
                                     {"sequential": True, "refit": True, "allocation": "uniform"}])
def test_merging_with_data_keeps_the_budget_and_a_loadable_model(options, tmp_path):
    model = tiny_model("mixtral")
    pruner = GrapePruner(small(pruning_ratio=0.25, **options))
    stats = pruner.calibrate(model, random_token_batches(n=12))
    plan = pruner.plan(stats, model)
    pruner.apply(model, plan)
    report = plan.metadata["merged_with_data"]
    assert report["refit"] == options.get("refit", False) and len(report["layers"]) == 4
    assert plan.num_removed == 8 and sum(l.num_experts for l in find_moe_layers(model)[1]) == 24
    assert torch.isfinite(logits(model)).all()
    pruner.save_pretrained(model, tmp_path / "out")
    assert PruningPlan.from_json((tmp_path / "out" / "grape_plan.json").read_text()).clusters == plan.clusters


def test_sequential_needs_a_method_that_can_replan_a_layer():
    with pytest.raises(GrapeConfigError, match="sequential=True"):
        GrapePruner(GrapeConfig(pruning_ratio=0.25, method="frequency", sequential=True))
