"""Finding a base model by name (checkpoint/load.py): a local path that does not exist never reaches
the network, and a Hub id with HF_HUB_OFFLINE set is looked up in the cache only."""

import socket

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
