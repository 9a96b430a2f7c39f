"""Where every tensor of a safetensors checkpoint lives, and which part of the model it belongs to.

A checkpoint is one `model.safetensors` or shards listed in `model.safetensors.index.json`. Its keys
are in the checkpoint's own layout (e.g. Mixtral's per-expert `block_sparse_moe.experts.3.w1.weight`),
which transformers converts on load (renamings, fusing experts into `mlp.experts.gate_up_proj`).
Each key is renamed here with transformers' own conversion rules to the model parameter it feeds, so
keys can be grouped by the decoder layer they load into and read one group at a time, without
opening more than the tensors asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, UnsupportedModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointIndex:
    """Key -> file of a local safetensors checkpoint; tensors are read lazily, one key at a time."""

    def __init__(self, folder) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"Cannot read {index}: {err}.") from None
            self.files = {key: self.folder / name for key, name in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            path = self.folder / SINGLE_FILE
            self.files = {key: path for key in _keys(path)}
        else:
            raise UnsupportedModelError(
                f"Layer-by-layer mode reads safetensors weights, and {str(self.folder)!r} has neither {SINGLE_FILE} nor "
                f"{INDEX_FILE}. Convert the checkpoint to safetensors (transformers saves it so by default), or prune "
                "in memory (without --layer-by-layer).")
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def read(self, key: str):
        path = self.files[key]
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"Cannot read weight file {path}: {err}.") from None
        return handle.get_tensor(key)

    def first_float_dtype(self):
        """The dtype of the first floating-point tensor: the checkpoint's dtype, as `dtype="auto"` reads it."""
        for key in self.files:
            tensor = self.read(key)
            if tensor.is_floating_point():
                return tensor.dtype
        return None

    def num_elements(self) -> int:
        """Elements of every tensor, read from the headers (tied weights are stored, and counted, once)."""
        total = 0
        for path in sorted(set(self.files.values())):
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    shape = handle.get_slice(key).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    total += n
        return total

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in set(self.files.values()))

    def close(self) -> None:
        self._handles.clear()

    def group_by_layer(self, target_of, layers_prefix: str) -> dict[int | None, list[str]]:
        """Checkpoint keys grouped by the decoder layer of the parameter each loads into (`target_of`:
        checkpoint key -> model key; decoder layer i is the module `{layers_prefix}.{i}`); None groups
        everything else (embeddings, final norm, head, a vision tower's own layers)."""
        groups: dict[int | None, list[str]] = {}
        head = layers_prefix + "."
        for key in self.files:
            target = target_of(key)
            index = int(target[len(head):].split(".", 1)[0]) if target.startswith(head) else None
            groups.setdefault(index, []).append(key)
        return groups


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"Cannot read weight file {path}: {err}.") from None
