"""Atomic writing (checkpoint/staging.py): an interrupted save leaves nothing at the destination and
an interrupted overwrite keeps the old checkpoint; staging folders a dead process left are cleaned
and nothing else; output folders honour the umask."""

import logging
import os
import subprocess
import sys

import pytest

from factories import pruned_model, random_token_batches, tiny_model
from optimum_grape import GrapeConfig, GrapePruner


def pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, **kwargs))


def test_interrupted_save_leaves_nothing_at_the_destination(tmp_path, monkeypatch):
    model = tiny_model("mixtral")
    p = pruner(pruning_ratio=0.25)
    p.prune(model, random_token_batches())

    def half_write(folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", half_write)
    with pytest.raises(KeyboardInterrupt):
        p.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind either


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = tiny_model("mixtral")
    p = pruner(pruning_ratio=0.25)
    p.prune(model, random_token_batches())
    p.save_pretrained(model, tmp_path / "out")
    old = (tmp_path / "out" / "model.safetensors").read_bytes()
    monkeypatch.setattr(model, "save_pretrained", lambda folder, **kw: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        p.save_pretrained(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == old


def test_staging_left_by_a_dead_process_is_cleaned_and_nothing_else(tmp_path, caplog):
    from optimum_grape.checkpoint.staging import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host()
    stale_partial = tmp_path / f".out.partial-{dead.pid}-{host}-0123abcd"
    stale_old = tmp_path / f".out.old-{dead.pid}-{host}"
    kept = [tmp_path / f".out.partial-{os.getppid()}-{host}-0123abcd",  # owner alive
            tmp_path / f".out.partial-{dead.pid}-ffffffff-0123abcd",  # another host: cannot tell
            tmp_path / ".out.partial-k2j3h4_x",  # an older version's name: owner unknown
            tmp_path / f".other.partial-{dead.pid}-{host}-0123abcd",  # another output's
            tmp_path / f".out.partial-{dead.pid}-{host}-0123abcd.tex"]  # not a name we make
    for folder in [stale_partial, stale_old, *kept]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    model, pruner = pruned_model()
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        pruner.save_pretrained(model, tmp_path / "out")
    # out did not exist: the '.old' folder is the only copy of what was there, so it stays
    assert not stale_partial.exists() and stale_old.exists() and "kept: move it back" in caplog.text
    pruner.save_pretrained(model, tmp_path / "out", overwrite=True)
    assert not stale_old.exists() and all((k / "model.safetensors").exists() for k in kept)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_output_folders_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        pruner, model = pruned_model()[::-1]
        pruner.save_pretrained(model, tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
