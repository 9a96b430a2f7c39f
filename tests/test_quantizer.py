"""The 'grape' quantizer (quantizer.py): a pruned checkpoint loads back with `import optimum_grape`,
also when written by the model's own `save_pretrained`; with uniform counts it loads without the
plugin, with per-layer counts it fails loudly without it; and a loaded pruned model is not treated
as a quantized one (it casts and trains)."""

import json

import pytest
import torch

from factories import random_token_batches, tiny_model
from helpers import PROBE, logits, logits_in_fresh_process
from optimum_grape import GrapeConfig, GrapePruner


def small_config(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def test_uniform_counts_reload_without_the_plugin(tmp_path):
    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25, allocation="uniform"))
    pruner.prune(model, random_token_batches())
    assert set(pruner.last_plan.experts_per_layer.values()) == {6}
    expected = logits(model)
    out = pruner.save_pretrained(model, tmp_path / "uniform")
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 6
    assert torch.allclose(logits_in_fresh_process(out, use_plugin=False), expected, atol=1e-5)


def test_model_save_pretrained_alone_writes_a_loadable_checkpoint(tmp_path):
    model = tiny_model("olmoe")
    GrapePruner(small_config(num_experts_to_prune=5)).prune(model, random_token_batches())
    expected = logits(model)
    model.save_pretrained(tmp_path / "plain")
    assert torch.allclose(logits_in_fresh_process(tmp_path / "plain"), expected, atol=1e-5)


def test_loaded_pruned_model_casts_and_trains_like_any_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    pruner.prune(model, random_token_batches())
    pruner.save_pretrained(model, tmp_path / "p")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert torch.allclose(logits(loaded.eval()), logits(model), atol=1e-5)
    loaded.half().float()  # refused by transformers for quantized models; a pruned one is not quantized
    loaded.train()
    out = loaded(PROBE, labels=PROBE)
    out.loss.backward()
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.grad is not None


def test_non_uniform_checkpoint_without_the_plugin_fails_loudly(tmp_path):
    """What the README and model card promise: no silent mis-load without `import optimum_grape`."""
    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    pruner.prune(model, random_token_batches())
    assert len(set(pruner.last_plan.experts_per_layer.values())) > 1
    out = pruner.save_pretrained(model, tmp_path / "nonuniform")
    with pytest.raises(AssertionError, match="ignore_mismatched_sizes"):
        logits_in_fresh_process(out, use_plugin=False)
