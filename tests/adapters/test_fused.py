"""The generic fused-experts adapter (adapters/fused.py): in a multimodal model only the text
decoder is pruned."""

import torch

from factories import random_token_batches
from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.adapters import find_moe_layers
from optimum_grape.coverage.tiny import build_tiny, scale_like_trained


def small_pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, batch_size=4, max_tokens_per_layer=64,
                                   **kwargs))


def test_a_multimodal_model_has_only_its_text_decoder_pruned():
    model = build_tiny("qwen3_vl_moe")
    scale_like_trained(model)
    _, layers = find_moe_layers(model)
    assert all(layer.name.startswith("model.language_model.layers.") for layer in layers)
    towers = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("model.language_model.")}
    small_pruner(pruning_ratio=0.25).prune(model, random_token_batches(n=4, length=16, vocab=90))
    assert towers and all(torch.equal(model.state_dict()[k], v) for k, v in towers.items())
    counts = [n for n in model.config.num_local_experts_per_layer if n is not None]
    assert sum(counts) == 6 * len(layers) and model.config.text_config.num_experts in (8, 6)
