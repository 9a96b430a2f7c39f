"""The scratch copy of converted decoder layers (layerwise/scratch.py): later passes read the copy
back to the bit, the copy needs room on disk, a disk that fills up only slows the job, and the copy is
gone when the job ends or fails. That each layer is converted once, and the job's output is the
in-memory path's with the copy in use, is checked on every family in test_model.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
import torch

from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.layerwise.scratch import LayerScratch, _storable
from optimum_grape.layerwise.skeleton import Skeleton

from .test_model import SMALL, assert_same_checkpoint, count_conversions, tiny_base


def test_a_layer_read_back_is_the_converted_layer_to_the_bit(tmp_path):
    tiny_base("deepseek_v3", tmp_path / "base")  # a correction-bias buffer besides the parameters
    skeleton = Skeleton(tmp_path / "base", scratch_beside=tmp_path / "out")
    layer = skeleton.layers[1]
    skeleton.load(1)
    converted = {k: v.clone() for k, v in layer.state_dict().items()}
    strides = {k: v.stride() for k, v in layer.state_dict().items()}
    grads = {n: p.requires_grad for n, p in layer.named_parameters()}
    skeleton.release(1)
    assert all(p.is_meta for p in layer.parameters())
    for buffer in layer.buffers():
        buffer.zero_()  # a pass that changed a buffer: the copy restores what the checkpoint gave
    skeleton.load(1)
    again = layer.state_dict()
    assert set(again) == set(converted)
    for key, tensor in converted.items():
        assert again[key].dtype == tensor.dtype and again[key].stride() == strides[key] and torch.equal(again[key], tensor)
    assert {n: p.requires_grad for n, p in layer.named_parameters()} == grads
    assert skeleton.scratch.path.parent == tmp_path and skeleton.scratch.path.name.startswith(".out.scratch-")
    skeleton.close()
    assert not list(tmp_path.glob(".out.scratch-*"))


def test_the_copy_holds_the_layer_as_converted_though_written_while_it_runs(tmp_path, monkeypatch):
    from optimum_grape.layerwise import scratch

    tiny_base("deepseek_v3", tmp_path / "base")
    skeleton = Skeleton(tmp_path / "base", scratch_beside=tmp_path / "out")
    layer = skeleton.layers[1]
    started, finish = threading.Event(), threading.Event()
    write = scratch.write_aligned

    def slow_write(state, path):  # the write is still going when the pass changes the layer's buffer
        started.set()
        assert finish.wait(10)
        write(state, path)

    monkeypatch.setattr(scratch, "write_aligned", slow_write)
    skeleton.load(1)
    converted = {k: v.clone() for k, v in layer.state_dict().items()}
    assert started.wait(10)
    for buffer in layer.buffers():
        buffer.add_(1.0)  # changed in place by the pass, before the copy is on disk
    finish.set()
    skeleton.release(1)  # waits for the write
    skeleton.load(1)
    again = layer.state_dict()
    assert all(torch.equal(again[k], v) for k, v in converted.items())
    skeleton.close()


def test_a_failed_write_other_than_a_full_disk_is_raised(tmp_path, monkeypatch):
    from optimum_grape.layerwise import scratch

    def broken(state, path):
        raise ValueError("a bug in the writer")

    tiny_base("mixtral", tmp_path / "base")
    skeleton = Skeleton(tmp_path / "base", scratch_beside=tmp_path / "out")
    monkeypatch.setattr(scratch, "write_aligned", broken)
    skeleton.load(0)
    with pytest.raises(ValueError, match="a bug in the writer"):
        skeleton.release(0)
    skeleton.close()
    assert not list(tmp_path.glob(".out.scratch-*"))


def test_no_copy_where_the_disk_lacks_room(tmp_path, caplog):
    output = tmp_path / "not" / "yet" / "out"
    with caplog.at_level(logging.INFO, logger="optimum_grape"):
        assert LayerScratch.if_room(output, 10**18) is None
    assert "GB free" in caplog.text and "converts the checkpoint's layers again" in caplog.text
    scratch = LayerScratch.if_room(output, 1)  # beside the output, whose folder is made as saving would
    assert scratch is not None and scratch.path.parent == output.parent
    scratch.close()
    assert not scratch.path.exists()


def test_a_scratch_a_killed_job_left_is_removed_by_the_next_job_there(tmp_path):
    from optimum_grape.checkpoint.staging import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.scratch-{dead.pid}-{_host()}-0123abcd"
    alive = tmp_path / f".out.scratch-{os.getppid()}-{_host()}-0123abcd"  # another job, still running
    for folder in (stale, alive):
        folder.mkdir()
        (folder / "layer-00000.safetensors").write_bytes(b"x")
    scratch = LayerScratch.if_room(tmp_path / "out", 1)
    assert not stale.exists() and (alive / "layer-00000.safetensors").exists()
    scratch.close()


def test_a_layer_safetensors_cannot_give_back_as_it_is_is_converted_again():
    weight = torch.randn(4, 6)
    assert _storable({"a": weight, "b": torch.zeros(3)})
    assert not _storable({"a": weight.t()})  # read back contiguous: other strides
    assert not _storable({"a": weight, "b": weight})  # shared: read back as two tensors
    assert not _storable({"a": torch.empty(2, device="meta")})


def test_the_copy_is_removed_when_the_job_fails(base_folder, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("planning failed")

    monkeypatch.setattr(GrapePruner, "plan", fail)
    with pytest.raises(RuntimeError, match="planning failed"):
        GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True)).prune_checkpoint(base_folder, tmp_path / "out")
    assert not list(tmp_path.glob(".out.scratch-*"))


def test_a_disk_that_fills_up_during_the_job_only_slows_it(base_folder, tmp_path, monkeypatch, caplog):
    import errno

    from optimum_grape.layerwise import scratch

    written = []
    write = scratch.write_aligned

    def fill_after_one(state, path):
        if written:
            path.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        write(state, path)

    monkeypatch.setattr(scratch, "write_aligned", fill_after_one)
    converted = count_conversions(monkeypatch)
    config = GrapeConfig(**SMALL, layer_by_layer=True)
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        GrapePruner(config).prune_checkpoint(base_folder, tmp_path / "out" / "full")
    assert "No space left on device" in caplog.text
    layers = [g for g in converted if g is not None]
    assert layers.count(0) == 1 and layers.count(1) > 1  # the first layer's copy is used, the rest convert
    monkeypatch.setattr(LayerScratch, "if_room", classmethod(lambda cls, parent, size: None))
    GrapePruner(config).prune_checkpoint(base_folder, tmp_path / "out" / "none")
    assert_same_checkpoint(tmp_path / "out" / "full", tmp_path / "out" / "none")


def test_a_copy_gone_missing_is_converted_again_with_a_warning(tmp_path, caplog):
    tiny_base("mixtral", tmp_path / "base")
    skeleton = Skeleton(tmp_path / "base", scratch_beside=tmp_path / "out")
    skeleton.load(0)
    converted = {k: v.clone() for k, v in skeleton.layers[0].state_dict().items()}
    skeleton.release(0)
    for copy in skeleton.scratch.path.iterdir():
        copy.unlink()
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        skeleton.load(0)
    assert "Cannot read the scratch copy of decoder layer 0" in caplog.text and "converting it again" in caplog.text
    again = skeleton.layers[0].state_dict()
    assert all(torch.equal(again[k], v) for k, v in converted.items())
    skeleton.close()


def test_a_place_the_scratch_cannot_go_gets_none_and_says_why(tmp_path, caplog):
    (tmp_path / "a_file").write_text("not a folder")
    with caplog.at_level(logging.INFO, logger="optimum_grape"):
        assert LayerScratch.if_room(tmp_path / "a_file" / "out", 1) is None
    assert "No scratch copy of the converted layers beside" in caplog.text and "a_file" in caplog.text


def test_a_checkpoint_refused_leaves_no_scratch(tmp_path):
    from optimum_grape.errors import UnsupportedModelError

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(UnsupportedModelError, match="Cannot read the config"):
        Skeleton(tmp_path / "base", scratch_beside=tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # nothing made for a job that never starts
