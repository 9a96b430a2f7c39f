"""Where a job may write and what it may replace (checkpoint/destinations.py), issue 12: `--save-stats`
and `--overwrite` never replace what the job reads nor anything optimum-grape did not write, and a bad
`--save-stats` is refused before the model loads. The CLI runs in this process (`cli.main`)."""

from __future__ import annotations

import os
import shutil

import pytest

from factories import random_token_batches, tiny_model
from helpers import cli_prune, write_json
from optimum_grape import CheckpointError, GrapeConfig, GrapePruner
from optimum_grape.checkpoint.destinations import check_destination


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
    # a loose file of the user's inside an earlier checkpoint is never deleted by overwrite (issue 25)
    (tmp_path / "ckpt" / "MY_NOTES.txt").write_text("the user's own")
    before = sorted(q.name for q in (tmp_path / "ckpt").iterdir())
    with pytest.raises(CheckpointError, match=r"MY_NOTES.txt.*not in its grape_manifest.json"):
        p.save_pretrained(model, tmp_path / "ckpt", overwrite=True)
    assert sorted(q.name for q in (tmp_path / "ckpt").iterdir()) == before
    (tmp_path / "ckpt" / "MY_NOTES.txt").unlink()
    (tmp_path / "ckpt" / "README.md").write_text("edited card: a file optimum-grape wrote, replaced")
    p.save_pretrained(model, tmp_path / "ckpt", overwrite=True)
    assert "edited card" not in (tmp_path / "ckpt" / "README.md").read_text()


@pytest.mark.parametrize("make", ["empty text", "link to an empty folder", "dangling link", "read-only parent"])
def test_an_output_that_cannot_be_written_as_a_folder_is_refused_before_any_work(tmp_path, make):
    # issue 25: each used to fail (or leave a hidden link behind) only after loading and pruning
    if make == "empty text":
        out = ""
    elif make == "read-only parent":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
        out = parent / "out"
    else:
        out = tmp_path / "link"
        target = tmp_path / ("empty" if make == "link to an empty folder" else "missing")
        if make == "link to an empty folder":
            target.mkdir()
        out.symlink_to(target)
    before = sorted(str(q) for q in tmp_path.rglob("*"))
    match = {"empty text": "empty text", "read-only parent": "not writable"}.get(make, "symbolic link")
    with pytest.raises(CheckpointError, match=match):
        check_destination(out, overwrite=True)
    assert sorted(str(q) for q in tmp_path.rglob("*")) == before


def test_an_output_that_cannot_fit_on_its_disk_is_refused_before_any_work(base_folder, tmp_path, monkeypatch):
    # issue 25: a full disk failed with a raw traceback after loading and pruning
    import shutil as shutil_module

    from optimum_grape.checkpoint.destinations import check_free_space

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"0.00 GB free on its disk, but the pruned checkpoint needs at least"):
        check_free_space(tmp_path / "out", base_folder, 0.25)
    check_free_space(tmp_path / "out", base_folder, None)  # a count budget: no bound known, nothing refused
