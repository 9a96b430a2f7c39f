"""The SHA-256 manifest of a saved checkpoint (checkpoint/manifest.py), checked by
`optimum-grape inspect --verify`: one flipped bit in a weight file is named."""

import hashlib
import json

from factories import pruned_model
from optimum_grape.cli import main


def test_verify_names_a_damaged_weight_file(tmp_path, capsys):
    model, pruner = pruned_model()
    out = pruner.save_pretrained(model, tmp_path / "out")
    weights = out / "model.safetensors"
    manifest = json.loads((out / "grape_manifest.json").read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert main(["inspect", "--verify", str(out)]) == 0 and "OK" in capsys.readouterr().out
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a tensor: safetensors itself loads this silently
    weights.write_bytes(bytes(data))
    assert main(["inspect", "--verify", str(out)]) == 1
    assert "model.safetensors: SHA-256 mismatch" in capsys.readouterr().err
    (out / "grape_manifest.json").unlink()
    assert main(["inspect", "--verify", str(out)]) == 2 and "no grape_manifest.json" in capsys.readouterr().err


def test_a_file_hashed_ahead_keeps_its_digest_through_a_rename_and_not_through_a_rewrite(tmp_path):
    import os

    from optimum_grape.checkpoint import manifest

    part = tmp_path / ".part-00000.safetensors"
    part.write_bytes(b"first" * 1000)
    manifest.hash_ahead(part)
    final = tmp_path / "model-00001-of-00002.safetensors"
    part.rename(final)
    assert manifest.sha256_file(final) == hashlib.sha256(b"first" * 1000).hexdigest()
    assert not manifest._AHEAD  # consumed
    manifest.hash_ahead(final)
    final.write_bytes(b"second" * 1000)  # written again after hashing started: another size and mtime
    os.utime(final, ns=(1, 1))
    assert manifest.sha256_file(final) == hashlib.sha256(b"second" * 1000).hexdigest()
    manifest._AHEAD.clear()
