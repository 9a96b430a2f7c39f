"""Uploading a saved pruned folder (checkpoint/save.py): the weights first, the model card last."""

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
