"""Calibrating experts kept as an `nn.ModuleList` (calibration/hooks.py), on the tiny remote-code
MoE: every routed token is recorded, and a router that does not return logits is refused."""

import pytest

from factories import random_token_batches, tiny_model
from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.adapters import find_moe_layers


def small_config(**kwargs):
    defaults = dict(num_samples=4, sequence_length=16, batch_size=4, max_tokens_per_layer=64)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def batches():
    return random_token_batches(n=4, length=16)


def test_modulelist_calibration_records_every_routed_token():
    model = tiny_model("modulelist")
    stats = GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, batches())
    for layer in stats.layers.values():
        assert float(layer.tokens.sum()) == 4 * 16 * 2  # top-2 of every token
        assert float(layer.weight_mass.sum()) == pytest.approx(4 * 16, rel=1e-5)
        assert layer.similarity.shape == (8, 8) and (layer.saliency > 0).any()


def test_modulelist_router_that_does_not_return_logits_is_refused():
    from optimum_grape import UnsupportedModelError

    model = tiny_model("modulelist")
    for layer in find_moe_layers(model)[1]:
        layer.router.register_forward_hook(lambda module, args, out: (out.topk(2).indices, out))
    with pytest.raises(UnsupportedModelError, match="does not return logits"):
        GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, batches())
