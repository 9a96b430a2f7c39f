"""`ExpertStats` (stats.py): saved and loaded back exactly and replanned identically; saving replaces
only a statistics file; files that are not statistics are refused with the reason."""

import pytest
import torch
from safetensors.torch import save_file

from factories import random_token_batches, tiny_model
from optimum_grape import CheckpointError, ExpertStats, GrapeConfig, GrapePruner, PruningPlan
from optimum_grape.errors import StatsError


def small_config(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def test_stats_save_load_and_replan_is_identical(tmp_path):
    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    stats = pruner.calibrate(model, random_token_batches())
    stats.save(tmp_path / "stats.safetensors")
    loaded = ExpertStats.load(tmp_path / "stats.safetensors")
    assert loaded.metadata == stats.metadata
    assert torch.equal(loaded.layers[1].similarity, stats.layers[1].similarity)
    assert pruner.plan(loaded).to_json() == pruner.plan(stats).to_json()
    assert PruningPlan.from_json(pruner.plan(stats).to_json()).to_json() == pruner.plan(stats).to_json()


def test_stats_save_replaces_only_statistics(tmp_path, planned):
    stats = ExpertStats.load(planned["stats"])
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="not an optimum-grape statistics file"):
        stats.save(tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    stats.save(tmp_path / "s.safetensors")
    stats.save(tmp_path / "s.safetensors")  # a statistics file is replaced (atomically: no partial file left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "s.safetensors"]


def test_files_that_are_not_statistics_are_refused(tmp_path, base_folder):
    (tmp_path / "garbage").write_bytes(b"garbage")
    (tmp_path / "bad_header.safetensors").write_bytes(b"")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad_header.safetensors"), metadata={"grape_stats": "{oops"})
    for path, needle in ((tmp_path / "garbage", "Cannot read statistics"),
                         (base_folder / "model.safetensors", "without a 'grape_stats' header"),
                         (tmp_path / "bad_header.safetensors", "not valid JSON")):
        with pytest.raises(StatsError) as err:
            ExpertStats.load(path)
        assert needle in str(err.value)
