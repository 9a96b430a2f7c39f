"""Tiny MoE models built from the real transformers config classes, with random weights, and
helpers to plant redundancy in them. One table drives the family test matrix."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2)

FAMILIES = {
    "mixtral": lambda layers, experts: MixtralConfig(**COMMON, intermediate_size=48, num_hidden_layers=layers,
                                                     num_local_experts=experts),
    "qwen3_moe": lambda layers, experts: Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=48,
                                                        num_hidden_layers=layers, num_experts=experts,
                                                        head_dim=8, norm_topk_prob=True),
    "olmoe": lambda layers, experts: OlmoeConfig(**COMMON, intermediate_size=48, num_hidden_layers=layers,
                                                 num_experts=experts),
}


def tiny_model(family: str = "mixtral", layers: int = 4, experts: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    config = FAMILIES[family](layers, experts)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Default inits make experts nearly silent (and Qwen3/OLMoE routers all-zero): give experts and
    # routers enough scale that which expert runs changes the logits, as in a trained model.
    from optimum_grape.adapters import find_moe_layers

    with torch.no_grad():
        for layer in find_moe_layers(model)[1]:
            layer.router.weight.normal_(0.0, 0.5)
            for tensor in (layer.experts.gate_up_proj, layer.experts.down_proj):
                tensor.normal_(0.0, 0.3)
    return model


def plant_copies(model, layer: int, copies: list[int], source: int | None = None, noise: float = 0.0) -> None:
    """Make experts `copies` of decoder layer `layer` equal to `source` (default: the first copy)."""
    from optimum_grape.adapters import find_moe_layers

    _, layers = find_moe_layers(model)
    block = next(l for l in layers if l.index == layer)
    source = copies[0] if source is None else source
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            tensor = getattr(block.experts, name)
            for c in copies:
                tensor[c] = tensor[source] + noise * torch.randn_like(tensor[source])


def random_token_batches(n: int = 8, length: int = 32, vocab: int = 96, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen) for _ in range(n)]
