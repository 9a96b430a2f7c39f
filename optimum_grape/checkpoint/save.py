"""Writing a pruned model as a Hub-ready folder (weights, config with per-layer counts, plan,
model card and its inputs, plot, SHA-256 manifest), atomically, and uploading that folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .card import base_license, plot_ahead, set_repo_id, wait_for_plot, write_inputs, write_model_card
from .destinations import check_destination
from .staging import make_staging_folder, staging_path
from ..errors import CheckpointError
from .manifest import hash_ahead, write_manifest
from .remote_code import write_remote_code
from ..plan import PruningPlan

PLAN_FILE = "grape_plan.json"
# Above this many bytes of weights, a model in memory is written one decoder layer per shard
# (`write_weights_streamed`): transformers' save_pretrained reverts the key conversions of the whole
# state dict at once (un-fusing every expert tensor into per-expert copies: half the model again for
# an MoE). Below it, one file as save_pretrained writes it, the extra copy being small.
STREAM_WEIGHTS_ABOVE = 1 << 30


def write_folder(model, folder: Path, tokenizer=None, plan: PruningPlan | None = None, evaluation=None,
                 base_model: str | None = None, write_model=None) -> None:
    """`write_model(folder)` writes weights and config instead of `model.save_pretrained` (layer-by-layer
    mode streams them; `plan` is read after it, since applying the plan as it streams completes it)."""
    if write_model is None and plan is not None:  # a streamed write completes its plan; this one is final
        plot_ahead(plan, folder)  # the card's plot, drawn while the weights are written
    try:
        _write_folder(model, folder, tokenizer, plan, evaluation, base_model, write_model)
    except BaseException:
        wait_for_plot(folder)  # before the caller removes the folder
        raise


def _write_folder(model, folder: Path, tokenizer, plan, evaluation, base_model, write_model) -> None:
    from ..adapters import get_adapter

    if write_model is not None:
        write_model(folder)
    else:
        original = getattr(get_adapter(model), "save_original_format", True)
        if _weight_bytes(model) > STREAM_WEIGHTS_ABOVE and streamable(model):
            write_weights_streamed(model, folder, original)
        else:
            model.save_pretrained(folder, safe_serialization=True, save_original_format=original)
    write_remote_code(folder, model)  # a non-uniform layout loads without optimum-grape too
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if plan is not None:
        (folder / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
    source = getattr(model, "name_or_path", None) or base_model  # the base's own card gives the license
    write_inputs(folder, {"base_model": base_model, "license": base_license(source or None),
                          "evaluation": evaluation or {}})
    write_model_card(folder)


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def streamable(model) -> bool:
    """Whether `write_weights_streamed` writes what save_pretrained would: a plain model whose weights
    are all in memory (no quantizer, offloading, adapters or remote code that save_pretrained handles)."""
    import torch

    from ..calibration.stream import decoder_layers
    from ..errors import UnsupportedModelError

    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "_hf_peft_config_loaded", False):
        return False
    if model.is_remote_code() or "disk" in (getattr(model, "hf_device_map", None) or {}).values():
        return False
    if any(p.is_meta or type(p.data) is not torch.Tensor for p in model.parameters()):
        return False
    try:
        decoder_layers(model)
    except UnsupportedModelError:
        return False
    return True


def write_weights_streamed(model, folder: Path, save_original_format: bool = True) -> None:
    """Weights and config of a model in memory, one shard per decoder layer and one for the rest
    (`layerwise.writer.ShardWriter`, as layer-by-layer mode writes them): only one layer's tensors are
    converted back to the checkpoint's layout at a time."""
    from ..calibration.stream import decoder_layers
    from ..layerwise.writer import ShardWriter, write_config

    path, layers = decoder_layers(model)
    writer = ShardWriter(folder, model, getattr(model, "_weight_conversions", None), save_original_format)
    inside = set()
    # Each shard's manifest digest is computed while the next is written (finish() renames shards,
    # which keeps them the same files).
    for i, layer in enumerate(layers):
        _hash_ahead(writer.write_part(layer.state_dict(prefix=f"{path}.{i}.")))
        inside |= {id(t) for t in [*layer.parameters(), *layer.buffers()]}
    _hash_ahead(writer.write_part({k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in inside}))
    writer.finish()
    write_config(model, folder, model.dtype)


def _hash_ahead(shard: Path | None) -> None:
    if shard is not None:  # None: an empty part, which finish() deletes
        hash_ahead(shard)


def save_pruned(model, out_dir, tokenizer=None, plan: PruningPlan | None = None, overwrite: bool = False,
                evaluation=None, base_model: str | None = None, write_model=None) -> Path:
    """Write everything next to the destination first, then move it into place: an interrupted save
    never leaves a half-written checkpoint at `out_dir`. The folder gets a SHA-256 manifest of its
    weight files (`checkpoint/manifest.py`). `overwrite` replaces only a checkpoint optimum-grape wrote, never
    the folder the model was loaded from (`destinations.check_destination`)."""
    out_dir = Path(out_dir)
    if write_model is None and not _carries_grape_layout(model):
        raise CheckpointError(f"{type(model).__name__} was never pruned by optimum-grape (its config has no 'grape' "
                              "quantization_config), so its card would describe a pruning that did not happen. "
                              "Call pruner.prune(model, data) or pruner.apply(model, plan) first, or save it with "
                              "model.save_pretrained.")
    check_destination(out_dir, overwrite, reads=[getattr(model, "name_or_path", None) or None])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_folder(out_dir)
    try:
        write_folder(model, staging, tokenizer, plan, evaluation, base_model, write_model)
        _usual_file_modes(staging)
        write_manifest(staging)
        if out_dir.exists():
            backup = staging_path(out_dir, "old")
            os.replace(out_dir, backup)
            os.replace(staging, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _carries_grape_layout(model) -> bool:
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)) == "grape"


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only set it, and
    setting it for a moment affects files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _usual_file_modes(folder: Path) -> None:
    """safetensors writes weight files 0600; give every file the mode any other file gets here (0666
    minus the umask), so a checkpoint shared on a server is readable like its config.json."""
    umask = _umask()
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def push_folder(folder, repo_id: str, private=None, token=None, api=None):
    """Upload a folder written by `save_pruned`. The card goes up in a second commit, after the
    weights, because uploading a model through transformers replaces README.md."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    set_repo_id(folder, repo_id)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload GRAPE-pruned model",
                      ignore_patterns=["README.md"])
    return api.upload_file(path_or_fileobj=(folder / "README.md").read_bytes(), path_in_repo="README.md",
                           repo_id=repo_id, commit_message="Add GRAPE model card")


def push_pruned(model, repo_id: str, tokenizer=None, plan=None, evaluation=None, private=None, token=None,
                base_model: str | None = None, api=None):
    """Write the folder `save_pruned` writes into a temporary place and upload it (`push_folder`)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pruned(model, Path(tmp) / "model", tokenizer, plan, evaluation=evaluation,
                             base_model=base_model)
        return push_folder(folder, repo_id, private=private, token=token, api=api)


def read_plan(folder) -> PruningPlan | None:
    path = Path(folder) / PLAN_FILE
    return PruningPlan.from_json(path.read_text(encoding="utf-8")) if path.exists() else None


def read_config_json(folder) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{str(folder)!r} has no config.json; pass a model folder.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Cannot read {path}: {err}.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; it is not a transformers config.")
    return config
