"""Where every tensor of a safetensors checkpoint lives, and which part of the model it belongs to.

A checkpoint is one `model.safetensors` or shards listed in `model.safetensors.index.json`. Its keys
are in the checkpoint's own layout (e.g. Mixtral's per-expert `block_sparse_moe.experts.3.w1.weight`),
which transformers converts on load (renamings, fusing experts into `mlp.experts.gate_up_proj`).
Each key is renamed here with transformers' own conversion rules to the model parameter it feeds, so
keys can be grouped by the decoder layer they load into and read one group at a time, without
opening more than the tensors asked for.

Tensors are read with plain file reads into memory of their own, not through safetensors' memory
map: every page of a mapping a process has touched counts as its resident memory for as long as the
mapping lives, and one zero-copy tensor kept from it (a norm weight, a router) keeps the whole file
mapped, so a layer-by-layer pass over a mapped checkpoint ends up holding the checkpoint's size.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

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
        self._headers: dict[Path, tuple[int, dict]] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def read(self, key: str) -> torch.Tensor:
        """Tensor `key`, read from its file into memory of its own (see the module docstring)."""
        path = self.files[key]
        return read_tensor(path, *self._header(path), key)

    def nbytes(self, key: str) -> int:
        """Bytes of tensor `key` on disk, from its file's header."""
        begin, end = self._header(self.files[key])[1][key]["data_offsets"]
        return end - begin

    def _header(self, path: Path) -> tuple[int, dict]:
        """(offset of the data section, header) of one safetensors file, parsed once."""
        if path not in self._headers:
            self._headers[path] = read_header(path)
        return self._headers[path]

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


def read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, header) of a safetensors file."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"Cannot read weight file {path}: {err}.") from None
    return 8 + length, header


def read_tensor(path: Path, start: int, header: dict, key: str) -> torch.Tensor:
    """Tensor `key` of the safetensors file `path` (data at `start`, `header` as `read_header` gives
    them), read with a plain file read into memory of its own."""
    entry = header.get(key)
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise CheckpointError(f"Cannot read {key!r} from {path}: missing, or a dtype this reader does not know "
                              f"({entry.get('dtype') if isinstance(entry, dict) else None!r}).")
    begin, end = entry["data_offsets"]
    out = torch.empty(end - begin, dtype=torch.uint8)
    with open(path, "rb") as handle:
        handle.seek(start + begin)
        if handle.readinto(memoryview(out.numpy())) != end - begin:
            raise CheckpointError(f"{path} is truncated: {key!r} needs bytes {begin}-{end} of its data.")
    return out.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


# safetensors dtype names -> torch dtypes (the format's full list that torch can hold).
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"Cannot read weight file {path}: {err}.") from None
