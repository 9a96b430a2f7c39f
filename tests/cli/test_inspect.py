"""`optimum-grape inspect` (cli/inspect.py) on checkpoints edited or emptied after they were written:
a damaged layout is refused by name, a count that disagrees with the layout is flagged with exit 1,
`--verify` never says OK about a folder with no weight file, and "weights on disk" counts
only the checkpoint's own files."""

import json
import shutil

from optimum_grape.cli import main


def _copy(pruned_cli, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(pruned_cli[0], folder)
    return folder


def _edit_layout(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_layout_edited_into_a_list_is_refused_by_name(pruned_cli, tmp_path, capsys):
    folder = _copy(pruned_cli, tmp_path)
    _edit_layout(folder, lambda c: c["quantization_config"]["pruned_layout"].update(experts_per_layer=[6, 6, 6, 6]))
    assert main(["inspect", str(folder)]) == 2
    assert "pruned_layout.experts_per_layer is list" in capsys.readouterr().err


def test_per_layer_counts_that_disagree_with_the_layout_are_flagged(pruned_cli, tmp_path, capsys):
    folder = _copy(pruned_cli, tmp_path)
    _edit_layout(folder, lambda c: c.update(num_local_experts_per_layer=[8, 8, 8, 8]))
    assert main(["inspect", str(folder)]) == 1
    assert "MISMATCH: num_local_experts_per_layer [8, 8, 8, 8]" in capsys.readouterr().err


def test_verify_never_says_ok_without_a_weight_file(pruned_cli, tmp_path, capsys):
    folder = _copy(pruned_cli, tmp_path)
    manifest = json.loads((folder / "grape_manifest.json").read_text())
    for name in manifest["files"]:
        (folder / name).unlink()
    manifest["files"] = {}
    (folder / "grape_manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", "--verify", str(folder)]) == 1
    assert "lists no weight file" in capsys.readouterr().err


def test_weights_on_disk_count_only_the_checkpoint_own_files(tmp_path):
    # issue 25: a checkpoint kept in a sub-folder was counted as weights of the folder around it
    from optimum_grape.evaluation.perplexity import folder_bytes

    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_bytes(b"x" * 1000)
    assert folder_bytes(tmp_path) == 100
