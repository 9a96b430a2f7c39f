"""Layer-by-layer pruning from disk (layerwise/model.py, `GrapePruner.prune_checkpoint`) gives the
in-memory path's plan and weights, on a tiny model of each kind the adapters tell apart and through
the CLI on the shipped model (one shard per decoder layer); a saved plan is checked against the
checkpoint on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli
from optimum_grape import GrapeConfig, GrapePruner


SMALL = dict(pruning_ratio=0.25, num_samples=4, sequence_length=16, batch_size=2, max_tokens_per_layer=64,
             selection_samples=2)


# One of each kind the adapters tell apart: Mixtral, shared experts, grouped sigmoid routing with a
# correction bias, GPT-OSS (transposed, biased), hybrid linear attention, hybrid Mamba, multimodal.
FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "qwen3_next", "jamba", "qwen3_vl_moe"]


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_same_checkpoint(a, b):
    plan_a, plan_b = (json.loads((f / "grape_plan.json").read_text()) for f in (a, b))
    assert plan_a == plan_b
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    config_a, config_b = (json.loads((f / "config.json").read_text()) for f in (a, b))
    assert config_a["num_local_experts_per_layer"] == config_b["num_local_experts_per_layer"]
    layout = lambda c: {k: v for k, v in c["quantization_config"].items() if k != "layer_by_layer"}  # noqa: E731
    assert layout(config_a) == layout(config_b)


def count_conversions(monkeypatch) -> list:
    """The parts `Skeleton` converts from the checkpoint (None: the non-layer part), in order."""
    from optimum_grape.layerwise.skeleton import Skeleton

    converted, convert = [], Skeleton._convert

    def counting(self, group):
        converted.append(group)
        convert(self, group)

    monkeypatch.setattr(Skeleton, "_convert", counting)
    return converted


def tiny_base(model_type: str, folder):
    from optimum_grape.coverage.tiny import build_tiny, scale_like_trained

    model = build_tiny(model_type)
    scale_like_trained(model)
    model.save_pretrained(folder)
    return type(model)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layer_by_layer_equals_in_memory(model_type, tmp_path, monkeypatch):
    cls = tiny_base(model_type, tmp_path / "base")
    data = list(torch.randint(0, 90, (6, 16), generator=torch.Generator().manual_seed(0)))
    in_memory = GrapePruner(GrapeConfig(**SMALL))
    model = cls.from_pretrained(tmp_path / "base").eval()
    in_memory.prune(model, data)
    in_memory.save_pretrained(model, tmp_path / "memory")
    converted = count_conversions(monkeypatch)
    GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True)).prune_checkpoint(tmp_path / "base", tmp_path / "streamed",
                                                                            data)
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    layers = [group for group in converted if group is not None]  # several passes, each layer converted once:
    assert sorted(layers) == list(range(model.config.get_text_config().num_hidden_layers))  # later ones read the copy
    assert not list(tmp_path.glob(".streamed.scratch-*"))  # and the copy is gone


def test_cli_layer_by_layer_equals_in_memory_on_the_shipped_model(tmp_path):
    common = ["prune", "default", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "2"]
    for name, extra in (("memory", []), ("streamed", ["--layer-by-layer"])):
        result = run_cli(*common, "--output", tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 7  # one shard per decoder layer, one for the rest
    from helpers import logits_of_many_in_one_process

    a, b = logits_of_many_in_one_process([tmp_path / "memory", tmp_path / "streamed"])
    assert torch.equal(a, b)


def test_a_saved_plan_is_checked_against_the_checkpoint_on_disk(base_folder, tmp_path):
    first = GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True))
    first.prune_checkpoint(base_folder, tmp_path / "a")
    plan = first.last_plan
    GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True)).prune_checkpoint(base_folder, tmp_path / "b", plan=plan)
    assert weights(tmp_path / "a").keys() == weights(tmp_path / "b").keys()
    plan.model_fingerprint = {**plan.model_fingerprint, "router_sha256": "0" * 64}
    from optimum_grape.errors import PlanError

    with pytest.raises(PlanError, match="different model"):
        GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True)).prune_checkpoint(base_folder, tmp_path / "c", plan=plan)
    assert not (tmp_path / "c").exists()


def test_a_saved_plan_gives_the_same_weights_in_memory_and_layer_by_layer(tmp_path):
    """`--plan` is one job in both modes: the calibration options say what the merges are computed on
    (activation-aware alignment), in memory as layer by layer."""
    common = ["prune", "default", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "2"]
    result = run_cli(*common, "--merge", "weighted", "--output", tmp_path / "first")  # merges that use data
    assert result.returncode == 0, result.stderr[-2000:]
    plan = tmp_path / "first" / "grape_plan.json"
    options = ["--plan", plan, "--num-samples", "6", "--sequence-length", "64", "--seed", "3"]
    for name, extra in (("memory", []), ("streamed", ["--layer-by-layer"])):
        result = run_cli("prune", "default", "--output", tmp_path / name, *options, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    merged = json.loads((tmp_path / "memory" / "grape_plan.json").read_text())["metadata"]["merged_with_data"]
    assert merged["align_on_activations"] is True  # the merges used the calibration data


def test_a_checkpoint_with_per_layer_counts_prunes_again_layer_by_layer_as_in_memory(tmp_path):
    # issue 25: GRAPE's default output (non-uniform counts) failed layer by layer with "parameters are
    # still missing": the empty model was built with the base count in every layer
    first = run_cli("prune", "default", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "2",
                    "--output", tmp_path / "first")
    assert first.returncode == 0, first.stderr[-2000:]
    counts = json.loads((tmp_path / "first" / "config.json").read_text())["num_local_experts_per_layer"]
    assert len(set(counts)) > 1
    again = ["prune", tmp_path / "first", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "2"]
    for name, extra in (("memory", []), ("streamed", ["--layer-by-layer"])):
        result = run_cli(*again, "--output", tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
