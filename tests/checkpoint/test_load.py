"""Finding a base model by name (checkpoint/load.py): a local path that does not exist never reaches
the network, and a Hub id with HF_HUB_OFFLINE set is looked up in the cache only."""

import json
import socket

import pytest

from transformers import AutoModelForCausalLM

from helpers import cli_prune


def test_a_local_path_that_does_not_exist_never_reaches_the_network(tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (tmp_path / "weights.bin").write_bytes(b"x")
    for base, needle in (("/does/not/exist", "does not exist"), ("./ws3", "does not exist"),
                         ("~/no-such-model", "does not exist"), ("models/org/name", "does not exist"),
                         (tmp_path, "no config.json"), (tmp_path / "weights.bin", "no config.json")):
        code, err = cli_prune(capsys, base, "--output", tmp_path / "o")
        assert code == 2 and needle in err, (base, err)


def test_a_hub_id_with_hf_hub_offline_is_looked_up_in_the_cache_only(tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    code, err = cli_prune(capsys, "no-such-org/no-such-model", "--output", tmp_path / "o")
    assert code == 2 and "HF_HUB_OFFLINE is set" in err


def _truncate(base):
    weights = base / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)


def _out_of_bounds_header(base):
    import struct

    weights = base / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9
    text = json.dumps(header, separators=(",", ":")).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])


def _edit_expert_count(base):
    config = json.loads((base / "config.json").read_text())
    config["num_local_experts"] = 6
    (base / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("mode", [[], ["--layer-by-layer"]])
@pytest.mark.parametrize("damage, needle", [(_truncate, "(damaged or truncated|Cannot read weight file)"),
                                            (_out_of_bounds_header, "(damaged or truncated|Cannot read weight file)"),
                                            (_edit_expert_count, "do not fit its config.json")])
def test_a_damaged_base_is_refused_with_what_to_fix_not_a_traceback(ws, tmp_path, capsys, damage, needle, mode):
    # issue 25: a truncated file, a header past the end, an edited expert count gave raw tracebacks in
    # memory; layer by layer called an edited expert count "missing parameters"
    import re

    damage(ws)
    code, err = cli_prune(capsys, ws, "--output", tmp_path / "out", "--sequence-length", "32", *mode)
    assert re.search(needle, err), err
    assert code == 2 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_base_is_read_tensor_by_tensor_without_a_lasting_map(base_folder, monkeypatch):
    """`load_base` has transformers read shards with pread, one conversion at a time (a memory-mapped
    checkpoint keeps every page read resident: ~2x the model). The wrapper must see transformers open
    each shard (it fails if transformers stops going through modeling_utils.safe_open), the weights
    must be those of a plain from_pretrained, and nothing is left patched or set afterwards."""
    import os

    import torch
    import transformers.modeling_utils as loading

    from optimum_grape.checkpoint.load import load_base

    original, opened = loading.safe_open, []

    def spy(*args, **kwargs):
        opened.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loading, "safe_open", spy)
    monkeypatch.delenv("HF_DEACTIVATE_ASYNC_LOAD", raising=False)
    model, _ = load_base(str(base_folder), trust_remote_code=False)
    assert opened == ["pread"]
    assert loading.safe_open is spy and "HF_DEACTIVATE_ASYNC_LOAD" not in os.environ
    plain = AutoModelForCausalLM.from_pretrained(base_folder)
    assert opened == ["pread", "mmap"]
    expected = plain.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
