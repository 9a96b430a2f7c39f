"""`GrapePruner` (pruner.py), the four steps behind one object: end to end on a tiny model of each
core family (calibrate -> plan -> apply -> save -> reload in a fresh process), and what it refuses
before calibrating (a budget beyond the floors, `layer_by_layer` on a loaded model, `sequential`
with a method that cannot re-plan a layer)."""

import json

import pytest
import torch

from factories import CORE_FAMILIES, random_token_batches, tiny_model
from helpers import PROBE, logits, logits_in_fresh_process
from optimum_grape import BudgetError, GrapeConfig, GrapeConfigError, GrapePruner, PruningPlan
from optimum_grape.adapters import find_moe_layers


FAMILY_NAMES = sorted(CORE_FAMILIES)  # every other family: tests/adapters/test_families.py


def small_config(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prune_save_reload_in_fresh_process(family, tmp_path):
    model = tiny_model(family)
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    stats = pruner.calibrate(model, random_token_batches())
    plan = pruner.plan(stats)
    assert plan.num_removed == 8
    pruner.apply(model, plan)
    # every count the forward reads agrees with the tensors
    adapter, layers = find_moe_layers(model)
    for layer in layers:
        n = plan.experts_per_layer[layer.index]
        assert layer.experts.num_experts == n and layer.router.num_experts == n
        assert layer.experts.gate_up_proj.shape[0] == n and layer.router.weight.shape[0] == n
    expected = logits(model)
    model.generate(PROBE[:1, :4], max_new_tokens=3, do_sample=False)
    out = pruner.save_pretrained(model, tmp_path / "pruned")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "grape"
    assert [c for c in config["num_local_experts_per_layer"]] == [plan.experts_per_layer[i] for i in range(4)]
    assert PruningPlan.from_json((out / "grape_plan.json").read_text()).clusters == plan.clusters
    card = (out / "README.md").read_text()
    assert "base_model" in card or "library_name: transformers" in card
    assert "experts before" in card and "import optimum_grape" in card
    assert torch.allclose(logits_in_fresh_process(out), expected, atol=1e-5)


def pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, **kwargs))


def test_budget_below_top_k_is_refused_before_calibration():
    model = tiny_model("mixtral")  # 4 layers x 8 experts, top-2: at most 24 removable
    with pytest.raises(BudgetError, match="at most 24"):
        pruner(num_experts_to_prune=25).calibrate(model, [])  # [] would fail later: budget is checked first


def test_budget_below_user_floor_is_refused():
    model = tiny_model("mixtral")
    with pytest.raises(BudgetError, match="min_experts_per_layer"):
        pruner(pruning_ratio=0.5, min_experts_per_layer=6).calibrate(model, random_token_batches())


SMALL = dict(pruning_ratio=0.25, num_samples=4, sequence_length=16, batch_size=2, max_tokens_per_layer=64,
             selection_samples=2)


def test_layer_by_layer_config_on_a_loaded_model_is_refused(base_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder)
    with pytest.raises(GrapeConfigError, match="prune_checkpoint"):
        GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True)).calibrate(model, list(torch.randint(0, 90, (4, 16))))


def test_sequential_needs_a_method_that_can_replan_a_layer():
    with pytest.raises(GrapeConfigError, match="sequential=True"):
        GrapePruner(GrapeConfig(pruning_ratio=0.25, method="frequency", sequential=True))
