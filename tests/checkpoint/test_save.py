"""Saving a pruned folder (checkpoint/save.py): uploads send the weights first and the model card
last; weight files get the usual mode; a large model is written one decoder layer at a time."""

import pytest
from transformers import AutoModelForCausalLM

from helpers import logits

from factories import random_token_batches, tiny_model
from optimum_grape import GrapeConfig, GrapePruner


def small_config(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def test_push_uploads_weights_first_then_the_card(tmp_path):
    """No network in tests: a stand-in for HfApi records what would be uploaded, in order."""
    from optimum_grape.checkpoint.save import push_pruned

    class RecordingApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, private=None, exist_ok=False):
            self.calls.append(("create_repo", repo_id))

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns=()):
            from fnmatch import fnmatch
            from pathlib import Path
            names = [p.name for p in Path(folder_path).iterdir()]
            self.calls.append(("upload_folder", sorted(n for n in names if not any(fnmatch(n, g) for g in ignore_patterns))))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, commit_message):
            self.calls.append(("upload_file", path_in_repo, path_or_fileobj.decode()[:3]))

    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    pruner.prune(model, random_token_batches())
    api = RecordingApi()
    push_pruned(model, "me/tiny-grape", plan=pruner.last_plan, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder", "upload_file"]
    assert "README.md" not in api.calls[1][1] and "model.safetensors" in api.calls[1][1]
    assert "grape_plan.json" in api.calls[1][1]
    assert api.calls[2][1:] == ("README.md", "---")


def test_weight_files_get_the_same_mode_as_the_other_files(tmp_path):
    # issue 25: safetensors wrote the weights 0600 while config.json got 0644
    import os

    model = tiny_model("mixtral")
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=8, sequence_length=32, batch_size=4,
                                     max_tokens_per_layer=128))
    pruner.prune(model, random_token_batches())
    umask = os.umask(0o022)
    try:
        folder = pruner.save_pretrained(model, tmp_path / "out")
    finally:
        os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o644}, modes


def test_a_model_never_pruned_is_not_saved_as_a_pruned_checkpoint(tmp_path):
    # issue 25: its card said it was pruned
    from optimum_grape import CheckpointError

    with pytest.raises(CheckpointError, match="never pruned by optimum-grape"):
        GrapePruner(GrapeConfig(pruning_ratio=0.25)).save_pretrained(tiny_model("mixtral"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_large_model_is_written_one_decoder_layer_at_a_time(tmp_path, monkeypatch):
    """Above STREAM_WEIGHTS_ABOVE, a pruned model in memory is written one shard per decoder layer (no
    whole-state-dict copy); the tensors are those save_pretrained writes, and the folder loads back."""
    import torch
    from safetensors import safe_open

    from factories import pruned_model
    from optimum_grape.checkpoint import save

    def tensors(folder):
        out = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as handle:
                out.update({k: handle.get_tensor(k) for k in handle.keys()})
        return out

    model, pruner = pruned_model()
    pruner.save_pretrained(model, tmp_path / "whole")
    monkeypatch.setattr(save, "STREAM_WEIGHTS_ABOVE", 0)
    pruner.save_pretrained(model, tmp_path / "streamed")
    assert len(list((tmp_path / "whole").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) == 5  # 4 layers + the rest
    whole, streamed = tensors(tmp_path / "whole"), tensors(tmp_path / "streamed")
    assert whole.keys() == streamed.keys() and all(torch.equal(whole[k], streamed[k]) for k in whole)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert torch.equal(logits(reloaded), logits(model))
    # Each shard was hashed while the next was written, before its rename: the manifest still holds
    # every shard's digest, and nothing is left waiting.
    import hashlib
    import json

    from optimum_grape.checkpoint import manifest

    listed = json.loads((tmp_path / "streamed" / "grape_manifest.json").read_text())["files"]
    shards = sorted((tmp_path / "streamed").glob("*.safetensors"))
    assert all(listed[p.name]["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() for p in shards)
    assert not manifest._AHEAD
