"""From a method's clusters to a plan (planning/build.py): each layer's sensitivity is measured end
to end and saved with the statistics; without a model to score candidates on, GRAPE's global plan at
its fixed gamma is used and the log says so."""

import logging

from factories import random_token_batches, tiny_model
from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.stats import ExpertStats


def small(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128, selection_samples=4)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def test_layer_sensitivity_is_measured_and_saved(tmp_path):
    model = tiny_model("qwen2_moe")
    pruner = GrapePruner(small(pruning_ratio=0.25))
    stats = pruner.calibrate(model, random_token_batches(n=12))
    assert all(s.sensitivity["kl"] >= 0 and s.sensitivity["merges"] >= 1 for s in stats.layers.values())
    stats.save(tmp_path / "stats.safetensors")
    loaded = ExpertStats.load(tmp_path / "stats.safetensors")
    assert all(loaded.layers[l].sensitivity == s.sensitivity for l, s in stats.layers.items())


def test_without_a_model_the_global_fallback_is_used_and_said(caplog):
    model = tiny_model("mixtral")
    pruner = GrapePruner(small(pruning_ratio=0.25))
    stats = pruner.calibrate(model, random_token_batches(n=12))
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        plan = pruner.plan(stats)
    assert plan.metadata["selection"]["chosen"] == "gamma=0.03" and plan.metadata["entropy_tolerance"] == 0.03
    assert plan.metadata["allocation_rule"] == "global" and plan.metadata["merge"] == "weighted"
    assert plan.metadata["selection"]["not_scored_because"] == "no model given to plan()"
    assert "not scored" in caplog.text and "'gamma=0.03'" in caplog.text
    uniform = GrapePruner(small(pruning_ratio=0.25, allocation="uniform")).plan(stats)
    assert set(uniform.experts_per_layer.values()) == {6}  # uniform only when asked
