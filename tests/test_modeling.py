"""Pruning on load (modeling.py, through quantizer.py): `GrapeModelForCausalLM.from_pretrained(...,
pruning_config=...)` gives the model `from_pretrained(..., quantization_config=GrapeConfig(...))`
gives, and that model saves and reloads."""

import torch

from factories import tiny_model
from helpers import logits, logits_in_fresh_process
from optimum_grape import GrapeConfig
from optimum_grape.adapters import find_moe_layers


def small_config(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def test_prune_on_load_through_quantization_config(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from optimum_grape.modeling import GrapeModelForCausalLM

    base = tmp_path / "base"
    tiny_model("mixtral").save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=small_config(pruning_ratio=0.25))
    assert sum(l.num_experts for l in find_moe_layers(model)[1]) == 24
    wrapped = GrapeModelForCausalLM.from_pretrained(base, pruning_config=small_config(pruning_ratio=0.25))
    assert sum(l.num_experts for l in find_moe_layers(wrapped)[1]) == 24
    assert torch.allclose(logits(model), logits(wrapped), atol=1e-5)
    model.save_pretrained(tmp_path / "onload")
    assert torch.allclose(logits_in_fresh_process(tmp_path / "onload"), logits(model), atol=1e-5)
