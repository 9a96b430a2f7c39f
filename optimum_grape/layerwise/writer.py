"""Writing a checkpoint one part at a time, as `save_pretrained` would write it whole.

Each part (a decoder layer, then everything else) becomes one shard the moment it is ready, so
memory never holds more than the part being written. Per part, the steps of `save_pretrained`:
keys it never saves dropped, tied weights written once, the checkpoint's key conversions reverted
(per-expert keys for Mixtral-style checkpoints), safetensors with `format: pt`. `finish` names the
shards `model-0000i-of-0000n.safetensors` (or `model.safetensors` when there is one) and writes the
index, and `write_config` writes config.json and generation_config.json as `save_pretrained` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_index import INDEX_FILE, SINGLE_FILE


class ShardWriter:
    def __init__(self, folder: Path, model, conversions: list, save_original_format: bool = True) -> None:
        self.folder, self.model = Path(folder), model
        self.conversions, self.original = conversions, save_original_format
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def write_part(self, state: dict[str, torch.Tensor]) -> Path | None:
        """Write one part's tensors (full model names, as in `model.state_dict()`) as a shard; its path,
        or None when the part holds no tensor (`finish` deletes such a file)."""
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        ignored = self.model._keys_to_ignore_on_save or []
        state = {k: v for k, v in state.items() if k not in ignored}
        state = remove_tied_weights_from_state_dict(state, self.model)
        if self.original:
            self.model._weight_conversions = self.conversions  # what loading applied: saving reverts it
            state = revert_weight_conversion(self.model, state)
        state = {k: v.detach().contiguous() for k, v in state.items()}
        path = self.folder / f".part-{len(self.parts):05d}.safetensors"
        save_file(state, str(path), metadata={"format": "pt"})
        self.parts.append((path, sorted(state)))
        self.total_bytes += sum(t.numel() * t.element_size() for t in state.values())
        return path if state else None

    def finish(self) -> None:
        parts = [(path, keys) for path, keys in self.parts if keys]
        for path, keys in self.parts:
            if not keys:
                path.unlink()
        if len(parts) == 1:
            parts[0][0].rename(self.folder / SINGLE_FILE)
            return
        weight_map = {}
        for i, (path, keys) in enumerate(parts, start=1):
            name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_config(model, folder: Path, dtype: torch.dtype) -> None:
    """config.json and generation_config.json, with the fields `save_pretrained` sets."""
    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
