"""`grape` (methods/grape.py): on constructed statistics and on tiny models with planted copies it
merges only the copies, in their layer (cprune beside it); its global budget beats the uniform one;
the default preset (merge cost, layer cap, candidates scored end to end) beats uniform, also on the
shipped model; the 'paper' preset is Algorithm 1 without candidates."""

import math

import pytest
import torch

from factories import plan_for, plant_copies, random_token_batches, tiny_model
from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.evaluation.perplexity import mean_kl


@pytest.mark.parametrize("method", ["grape", "cprune"])
def test_redundancy_aware_methods_cut_the_planted_layer(method):
    extra = {"method_kwargs": {"layer_fraction": 0.0}} if method == "cprune" else {"preset": "paper"}
    plan = plan_for(method, num_experts_to_prune=3, **extra)
    assert plan.experts_per_layer == {0: 8, 1: 8, 2: 5, 3: 8}
    assert all(set(c) <= set(range(6)) for c in plan.clusters[2] if len(c) > 1)


def small_config(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def planted_model():
    model = tiny_model("mixtral", layers=4, experts=8, seed=3)
    plant_copies(model, layer=2, copies=[0, 1, 2, 3, 4, 5])
    return model


def test_grape_merges_only_planted_copies_in_their_layer():
    model = planted_model()
    pruner = GrapePruner(small_config(num_experts_to_prune=3, preset="paper"))
    plan = pruner.plan(pruner.calibrate(model, random_token_batches(n=16)))
    for layer, clusters in plan.clusters.items():
        merged = [c for c in clusters if len(c) > 1]
        if layer == 2:
            assert all(set(c) <= set(range(6)) for c in merged) and plan.experts_per_layer[2] == 5
        else:
            assert merged == []


def test_global_budget_beats_uniform_on_planted_redundancy():
    held_out = torch.stack(random_token_batches(n=8, length=32, seed=7))
    reference = planted_model()
    with torch.no_grad():
        ref_logits = reference(held_out).logits
    deviation, kept = {}, {}
    for allocation in ("global", "uniform"):
        model = planted_model()
        pruner = GrapePruner(small_config(num_experts_to_prune=4, allocation=allocation))
        pruner.prune(model, random_token_batches(n=16))
        kept[allocation] = pruner.last_plan
        with torch.no_grad():
            deviation[allocation] = mean_kl(ref_logits, model(held_out).logits)
    # Global spends the whole budget on the copies (what remains is the router's re-routing of their
    # tokens); uniform must also make three costly merges elsewhere.
    assert kept["global"].experts_per_layer == {0: 8, 1: 8, 2: 4, 3: 8}
    assert all(set(c) <= set(range(6)) for c in kept["global"].clusters[2] if len(c) > 1)
    assert deviation["global"] * 2 < deviation["uniform"], deviation


# -- the default preset -----------------------------------------------------------------------------
def small(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128, selection_samples=4)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


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


def test_planted_copies_are_merged_exactly_with_the_defaults():
    """Layer 2 holds six copies of one expert: the defaults spend the whole budget of 3 on free merges
    there ([8, 8, 5, 8]), although the cap (twice the average cut) would stop a costly cut at 2."""
    model = tiny_model("mixtral", layers=4, experts=8, seed=3)
    plant_copies(model, layer=2, copies=[0, 1, 2, 3, 4, 5])
    pruner = GrapePruner(GrapeConfig(method="grape", num_experts_to_prune=3))
    plan = pruner.plan(pruner.calibrate(model, random_token_batches(n=16)), model)
    assert list(plan.experts_per_layer.values()) == [8, 8, 5, 8]
    assert all(set(c) <= set(range(6)) for c in plan.clusters[2] if len(c) > 1)
    assert list(pruner.plan(pruner.calibrate(model, random_token_batches(n=16))).experts_per_layer.values()) == \
        [8, 8, 5, 8]  # the same without a model: the fallback global plan


def test_the_merge_is_chosen_end_to_end_and_never_worse_than_drop():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_grape.cli import default_model_path

    path = default_model_path()
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=16, selection_samples=4))
    plan = pruner.plan(pruner.calibrate(model, None, tok), model)
    candidates = plan.metadata["candidates"]
    assert {c["merge"] for c in candidates} == {"weighted", "drop"}
    chosen = min(c["score"] for c in candidates)
    assert chosen <= min(c["score"] for c in candidates if c["merge"] == "drop")
    assert plan.metadata["merge"] == next(c["merge"] for c in candidates if c["score"] == chosen)
    assert plan.align_neurons == (plan.metadata["merge"] != "drop")


def test_shipped_model_default_respects_the_cap_and_beats_uniform_on_calibration_kl():
    """The issue's fast check on the embedded model: no layer below what the cap allows, and the chosen
    candidate's held-aside KL never above the uniform candidate's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_grape.cli import default_model_path

    path = default_model_path()
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=16, selection_samples=4))
    plan = pruner.plan(pruner.calibrate(model, None, tok), model)
    caps = plan.metadata["layer_caps"]  # of the chosen candidate: the floors' room for a plan planned uncapped
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
