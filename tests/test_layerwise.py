"""Layer-by-layer pruning from disk (optimum_grape/layerwise) gives the in-memory path's plan and
weights, holds one decoder layer at a time, and refuses what it cannot do before loading; and a
2-process torchrun calibration plans what one process plans."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.errors import GrapeConfigError, UnsupportedModelError
from optimum_grape.layerwise import LayerwiseModel
from optimum_grape.layerwise.skeleton import Skeleton

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


def tiny_base(model_type: str, folder):
    from optimum_grape.coverage.tiny import build_tiny, scale_like_trained

    model = build_tiny(model_type)
    scale_like_trained(model)
    model.save_pretrained(folder)
    return type(model)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layer_by_layer_equals_in_memory(model_type, tmp_path):
    cls = tiny_base(model_type, tmp_path / "base")
    data = list(torch.randint(0, 90, (6, 16), generator=torch.Generator().manual_seed(0)))
    in_memory = GrapePruner(GrapeConfig(**SMALL))
    model = cls.from_pretrained(tmp_path / "base").eval()
    in_memory.prune(model, data)
    in_memory.save_pretrained(model, tmp_path / "memory")
    GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True)).prune_checkpoint(tmp_path / "base", tmp_path / "streamed",
                                                                            data)
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")


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


def test_at_most_one_decoder_layer_is_in_memory(base_folder, tmp_path, monkeypatch):
    loaded, most = set(), [0]
    load, release = Skeleton.load, Skeleton.release

    def counting_load(self, group):
        load(self, group)
        if group is not None:
            loaded.add(group)
            most[0] = max(most[0], len(loaded))

    def counting_release(self, group):
        release(self, group)
        loaded.discard(group)
        assert all(p.is_meta for p in self.layers[group].parameters())

    monkeypatch.setattr(Skeleton, "load", counting_load)
    monkeypatch.setattr(Skeleton, "release", counting_release)
    GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True)).prune_checkpoint(base_folder, tmp_path / "out")
    assert most[0] == 1 and not loaded


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


def test_layer_by_layer_config_on_a_loaded_model_is_refused(base_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder)
    with pytest.raises(GrapeConfigError, match="prune_checkpoint"):
        GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True)).calibrate(model, list(torch.randint(0, 90, (4, 16))))


def test_a_checkpoint_without_safetensors_is_refused(tmp_path, base_folder):
    import shutil

    shutil.copytree(base_folder, tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        LayerwiseModel(tmp_path / "bin")


@pytest.mark.parametrize("extra, message", [
    (["--evaluate"], "--evaluate loads the whole model"),
    (["--device", "cuda"], "--layer-by-layer runs on the CPU"),
])
def test_cli_refuses_what_layer_by_layer_cannot_do_before_loading(tmp_path, extra, message):
    result = run_cli("prune", "default", "--output", tmp_path / "o", "--layer-by-layer", *extra)
    assert result.returncode == 2 and message in result.stderr and not (tmp_path / "o").exists()


def test_cli_refuses_layer_by_layer_under_torchrun(tmp_path):
    result = run_cli("prune", "default", "--output", tmp_path / "o", "--layer-by-layer", env={"WORLD_SIZE": "2"})
    assert result.returncode == 2 and "runs in one process" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_refuses_a_missing_cuda_device(tmp_path):
    result = run_cli("prune", "default", "--output", tmp_path / "o", "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def _torchrun(nproc: int, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(29500 + os.getpid() % 1000), "-m", "optimum_grape", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_two_gloo_processes_plan_what_one_process_plans(tmp_path):
    from optimum_grape.stats import ExpertStats

    common = ["prune", "default", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "4"]
    one = run_cli(*common, "--output", tmp_path / "one", "--save-stats", tmp_path / "one.safetensors")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(2, *common, "--output", tmp_path / "two", "--save-stats", tmp_path / "two.safetensors")
    assert two.returncode == 0, two.stderr[-3000:]
    plan_one, plan_two = (json.loads((tmp_path / n / "grape_plan.json").read_text()) for n in ("one", "two"))
    assert plan_one["clusters"] == plan_two["clusters"]
    a, b = ExpertStats.load(tmp_path / "one.safetensors"), ExpertStats.load(tmp_path / "two.safetensors")
    for layer in a.layers:
        for name in ("tokens", "weight_mass", "saliency", "max_output", "similarity"):
            x, y = getattr(a.layers[layer], name), getattr(b.layers[layer], name)
            assert torch.allclose(x, y, rtol=1e-9, atol=1e-12), (layer, name)
        assert a.layers[layer].sensitivity["kl"] == pytest.approx(b.layers[layer].sensitivity["kl"], rel=1e-9)


@pytest.mark.gpu
def test_cuda_prune_plans_what_the_cpu_plans(tmp_path):
    common = ["prune", "default", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "2"]
    cpu = run_cli(*common, "--output", tmp_path / "cpu")
    gpu = run_cli(*common, "--output", tmp_path / "gpu", "--device", "cuda")
    assert cpu.returncode == 0 and gpu.returncode == 0, gpu.stderr[-2000:]
    plans = [json.loads((tmp_path / n / "grape_plan.json").read_text()) for n in ("cpu", "gpu")]
    assert plans[0]["experts_per_layer"] == plans[1]["experts_per_layer"]
