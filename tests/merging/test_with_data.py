"""Merging with calibration data (merging/with_data.py): keep-all through the data merger is the
identity, a layer's captured inputs are what its experts receive, and every option keeps the budget
and a loadable model."""

import pytest
import torch

from factories import random_token_batches, tiny_model
from helpers import logits
from optimum_grape import GrapeConfig, GrapePruner, PruningPlan
from optimum_grape.adapters import find_moe_layers


def small(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128, selection_samples=4)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


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


def test_streamed_layer_inputs_are_those_of_a_forward_up_to_each_layer():
    """Merging with data carries the calibration states forward one decoder layer at a time (linear in
    depth); each MoE layer gets bit for bit what a forward up to it gives, also after earlier layers
    changed."""
    from optimum_grape.merging.with_data import StreamedInputs, layer_inputs

    for family in ("mixtral", "qwen2_moe"):
        model = tiny_model(family)
        batches = [torch.stack(random_token_batches(n=4))]
        adapter, layers = find_moe_layers(model)
        streamed = StreamedInputs(model, batches, max_tokens=64, seed=0)
        for layer in layers:
            got, expected = streamed(layer), layer_inputs(model, layer, batches, 64, 0)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (family, layer.index)
            adapter.apply_clusters(layer, [[0, 1]] + [[e] for e in range(2, layer.num_experts)],
                                   [[0.5, 0.5]] + [[1.0]] * (layer.num_experts - 2),
                                   [[1.0, 0.0]] + [[1.0]] * (layer.num_experts - 2))
            got, expected = streamed(layer), layer_inputs(model, layer, batches, 64, 0)  # asked again: refit
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (family, layer.index)
