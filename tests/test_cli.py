"""The CLI end to end, as a user runs it: a subprocess on a checkpoint folder."""

import json

from helpers import run_cli


def test_help_explains_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("prune", "inspect", "methods"):
        assert word in result.stdout
    prune_help = run_cli("prune", "--help").stdout
    assert "--ratio" in prune_help and "--allocation" in prune_help and "default" in prune_help


def test_prune_then_inspect(base_folder, tmp_path):
    out = tmp_path / "pruned"
    result = run_cli("prune", base_folder, "--output", out, "--ratio", "0.25", "--num-samples", "8",
                     "--sequence-length", "32", "--evaluate", "--eval-tokens", "256", "--save-stats",
                     tmp_path / "stats.safetensors", "--base-model", "example-org/tiny-mixtral")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removing 8 (25%)" in result.stdout and "held-out perplexity" in result.stdout
    assert (out / "README.md").exists() and (out / "grape_plan.json").exists()
    assert (tmp_path / "stats.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "| perplexity (bible) |" in card
    assert "base_model: example-org/tiny-mixtral" in card and "model-index:" in card
    inspected = run_cli("inspect", out)
    assert inspected.returncode == 0 and "method: grape" in inspected.stdout
    config = json.loads((out / "config.json").read_text())
    assert sum(config["quantization_config"]["pruned_layout"]["experts_per_layer"].values()) == 24

    # Re-apply the saved plan without calibrating: same layout.
    again = run_cli("prune", base_folder, "--output", tmp_path / "replayed", "--plan", out / "grape_plan.json")
    assert again.returncode == 0, again.stderr[-2000:]
    replayed = json.loads((tmp_path / "replayed" / "config.json").read_text())
    assert replayed["num_local_experts_per_layer"] == config["num_local_experts_per_layer"]


def test_existing_output_is_refused_before_loading(base_folder, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    result = run_cli("prune", "/does/not/exist", "--output", tmp_path / "taken")
    assert result.returncode == 2 and "overwrite" in result.stderr


def test_missing_plan_is_refused_before_loading(tmp_path):
    result = run_cli("prune", "/does/not/exist", "--output", tmp_path / "o", "--plan", tmp_path / "none.json")
    assert result.returncode == 2 and "is not a file" in result.stderr


def test_bad_ratio_is_refused(base_folder, tmp_path):
    result = run_cli("prune", base_folder, "--output", tmp_path / "o", "--ratio", "1.5")
    assert result.returncode == 2 and "outside (0, 1)" in result.stderr


def test_methods_lists_grape():
    result = run_cli("methods")
    assert result.returncode == 0 and "grape" in result.stdout
