"""Recording statistics during calibration (calibration/recorder.py): the model is left unchanged,
routing is recorded consistently, and only what the method needs is recorded."""

import pytest
import torch

from factories import random_token_batches, tiny_model
from helpers import logits
from optimum_grape import GrapeConfig, GrapePruner


def small_config(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def test_calibration_leaves_the_model_unchanged():
    model = tiny_model("qwen3_moe")
    before = logits(model)
    implementation = model.config._experts_implementation
    GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, random_token_batches())
    assert model.config._experts_implementation == implementation
    assert torch.equal(logits(model), before)


def test_calibration_records_routing_consistently():
    model = tiny_model("mixtral")
    batches = random_token_batches(n=8, length=32)
    stats = GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, batches)
    for layer in stats.layers.values():
        assert float(layer.tokens.sum()) == 8 * 32 * 2  # every token routed to top_k = 2 experts
        assert float(layer.weight_mass.sum()) == pytest.approx(8 * 32, rel=1e-5)  # renormalised top-k
        assert layer.similarity.shape == (8, 8) and (layer.saliency >= 0).all()


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
