"""Where a job may write and what it may replace (checkpoint/destinations.py), issue 12: `--save-stats`
and `--overwrite` never replace what the job reads nor anything optimum-grape did not write, and a bad
`--save-stats` is refused before the model loads. The CLI runs in this process (`cli.main`)."""

from __future__ import annotations

import shutil

import pytest

from factories import random_token_batches, tiny_model
from helpers import cli_prune, write_json
from optimum_grape import CheckpointError, GrapeConfig, GrapePruner


def pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, **kwargs))


def files(folder) -> dict:
    """Every file under `folder` with its bytes: what must not change."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_stats_never_replaces_the_input_model(ws, tmp_path, capsys):
    before = files(ws.parent)
    code, err = cli_prune(capsys, ws, "--output", tmp_path / "o", "--save-stats", ws / "model.safetensors")
    assert code == 2 and "which this job reads" in err
    code, err = cli_prune(capsys, ws, "--output", tmp_path / "o", "--save-stats", ws / "model.safetensors",
                          "--overwrite")
    assert code == 2
    assert files(ws.parent) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("where, needle", [
    ("missing/s.safetensors", "does not exist; create it first"),
    ("notes.txt", "not an optimum-grape statistics file"),
    (".", "is a folder"),
    ("o/s.safetensors", "inside the output folder"),
    ("stats.safetensors", "pass --overwrite"),
])
def test_save_stats_is_refused_before_the_model_loads(tmp_path, capsys, planned, where, needle):
    (tmp_path / "notes.txt").write_text("mine")
    shutil.copy(planned["stats"], tmp_path / "stats.safetensors")
    before = files(tmp_path)
    # BASE does not exist: the refusal must come before the model is looked for.
    code, err = cli_prune(capsys, "/does/not/exist", "--output", tmp_path / "o", "--save-stats", tmp_path / where)
    assert code == 2 and needle in err, err
    assert files(tmp_path) == before


def test_overwrite_never_deletes_the_input_or_unrelated_files(ws, tmp_path, capsys, planned):
    (ws.parent / "unrelated.txt").write_text("keep")
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    before, before_other = files(ws.parent), files(other)
    for output, needle in ((ws.parent, "which this job reads"), (ws, "which this job reads"),
                           (other, "not a checkpoint written by optimum-grape")):
        code, err = cli_prune(capsys, ws, "--output", output, "--overwrite")
        assert code == 2 and needle in err, err
    plan = write_json(tmp_path / "plan.json", planned["plan"])
    code, err = cli_prune(capsys, ws, "--output", tmp_path, "--overwrite", "--plan", plan)  # holds the plan it reads
    assert code == 2 and "which this job reads" in err
    assert files(ws.parent) == before and files(other) == before_other


def test_overwrite_replaces_a_checkpoint_but_not_its_added_folders(tmp_path, capsys, base_folder, planned):
    plan = write_json(tmp_path / "plan.json", planned["plan"])
    assert cli_prune(capsys, base_folder, "--output", tmp_path / "out", "--plan", plan)[0] == 0
    (tmp_path / "out" / "eval").mkdir()
    code, err = cli_prune(capsys, base_folder, "--output", tmp_path / "out", "--plan", plan, "--overwrite")
    assert code == 2 and "sub-folders ['eval']" in err
    (tmp_path / "out" / "eval").rmdir()
    assert cli_prune(capsys, base_folder, "--output", tmp_path / "out", "--plan", plan, "--overwrite")[0] == 0


def test_non_empty_output_folder_is_refused_unless_overwrite(tmp_path):
    model = tiny_model("mixtral")
    p = pruner(pruning_ratio=0.25)
    p.prune(model, random_token_batches())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        p.save_pretrained(model, tmp_path / "out")
    # overwrite replaces only a checkpoint optimum-grape wrote (issue 12): never an unrelated folder
    with pytest.raises(CheckpointError, match="not a checkpoint written by optimum-grape"):
        p.save_pretrained(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    p.save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("replaced with the checkpoint")
    p.save_pretrained(model, tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "config.json").exists() and not (tmp_path / "ckpt" / "notes.txt").exists()
