"""`optimum-grape prune` as a user runs it, a subprocess on a checkpoint folder (cli/prune.py): prune
with --evaluate, inspect, replay the saved plan; and the checks made before anything loads (an
existing output, a bad ratio, what --layer-by-layer cannot do, a missing CUDA device)."""

import json

import pytest
import torch

from helpers import cli_prune, run_cli


def test_prune_then_inspect(base_folder, pruned_cli, tmp_path):
    out, result = pruned_cli
    assert "removing 8 (25%)" in result.stdout and "held-out perplexity" in result.stdout
    assert (out / "README.md").exists() and (out / "grape_plan.json").exists()
    assert (out.parent / "stats.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "| perplexity (bible) |" in card
    assert "base_model: example-org/tiny-mixtral" in card and "model-index:" in card
    assert "base_model_relation: finetune" in card and "![experts kept per layer" in card
    inspected = run_cli("inspect", out)
    assert inspected.returncode == 0 and "method: grape" in inspected.stdout
    config = json.loads((out / "config.json").read_text())
    assert sum(config["quantization_config"]["pruned_layout"]["experts_per_layer"].values()) == 24

    # Re-apply the saved plan without calibrating: same layout.
    again = run_cli("prune", base_folder, "--output", tmp_path / "replayed", "--plan", out / "grape_plan.json",
                    "--sequence-length", "32")
    assert again.returncode == 0, again.stderr[-2000:]
    replayed = json.loads((tmp_path / "replayed" / "config.json").read_text())
    assert replayed["num_local_experts_per_layer"] == config["num_local_experts_per_layer"]


def test_existing_output_is_refused_before_loading(base_folder, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    result = run_cli("prune", "/does/not/exist", "--output", tmp_path / "taken")
    assert result.returncode == 2 and "overwrite" in result.stderr


def test_bad_ratio_is_refused(base_folder, tmp_path):
    result = run_cli("prune", base_folder, "--output", tmp_path / "o", "--ratio", "1.5")
    assert result.returncode == 2 and "outside (0, 1)" in result.stderr


def test_plan_refuses_the_options_it_fixes_before_loading(pruned_cli, tmp_path):
    """A plan fixes clusters, budget, method and merge: a flag that would be silently ignored is refused."""
    plan = pruned_cli[0] / "grape_plan.json"
    result = run_cli("prune", "/no/such/model", "--output", tmp_path / "o", "--plan", plan, "--ratio", "0.5",
                     "--method", "frequency")
    assert result.returncode == 2 and not (tmp_path / "o").exists()
    assert "--plan fixes the clusters" in result.stderr and "--ratio, --method would be ignored" in result.stderr


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


@pytest.mark.gpu
def test_cuda_prune_plans_what_the_cpu_plans(tmp_path):
    common = ["prune", "default", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "2"]
    cpu = run_cli(*common, "--output", tmp_path / "cpu")
    gpu = run_cli(*common, "--output", tmp_path / "gpu", "--device", "cuda")
    assert cpu.returncode == 0 and gpu.returncode == 0, gpu.stderr[-2000:]
    plans = [json.loads((tmp_path / n / "grape_plan.json").read_text()) for n in ("cpu", "gpu")]
    assert plans[0]["experts_per_layer"] == plans[1]["experts_per_layer"]


def test_windows_longer_than_the_model_positions_are_refused_before_calibration(base_folder, tmp_path, capsys):
    # issue 25: --sequence-length 1000000 ran on (for hours) instead of being refused
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(base_folder).max_position_embeddings
    code, err = cli_prune(capsys, base_folder, "--output", tmp_path / "out", "--sequence-length", positions + 1)
    assert code == 2 and f"longer than the model's {positions} positions" in err and "--sequence-length" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", [[], ["--layer-by-layer"]])
def test_a_model_with_its_own_code_names_trust_remote_code_in_both_modes(tmp_path, capsys, mode):
    # issue 25: layer by layer gave a raw traceback; in memory the message did not name the flag
    from factories import tiny_model

    tiny_model("modulelist").save_pretrained(tmp_path / "base")
    code, err = cli_prune(capsys, tmp_path / "base", "--output", tmp_path / "out", *mode)
    assert code == 2 and "pass --trust-remote-code" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", [[], ["--layer-by-layer"]])
def test_a_tokenizer_of_another_model_is_refused_before_calibration(ws, tmp_path, capsys, mode):
    # token ids past the model's embedding failed with an IndexError deep inside the forward
    import shutil

    from optimum_grape.cli import default_model_path

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, ws / name)  # a 4,096-token vocabulary for a 96-row embedding
    code, err = cli_prune(capsys, ws, "--output", tmp_path / "out", "--num-samples", "4", "--sequence-length", "16",
                          *mode)
    assert code == 2 and "belongs to another model" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
