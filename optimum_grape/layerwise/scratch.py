"""Decoder layers kept on scratch disk in the form the model holds them, so that only the first pass
over a checkpoint converts them.

A layer-by-layer job passes over the decoder layers several times (calibration, scoring the
candidate plans, writing), and a checkpoint's layer is not stored as the model holds it: Mixtral's
or Qwen3-MoE's experts are one tensor per expert and projection, which transformers renames, stacks
and concatenates into fused tensors on every load. On the fine-grained benchmark model (128 experts,
8 layers) that conversion is 6.5 s of every pass, against about 1 s to read the same bytes. So the
first load of a layer writes its converted tensors (its `state_dict`: parameters and persistent
buffers) to one safetensors file here, and later loads map them back: the same bytes, dtypes and
shapes, so the same model to the bit.

The scratch costs disk the size of the model's decoder layers: it is made only where the disk keeps
room for it and for the pruned checkpoint as well, as a hidden folder beside the output named like
the checkpoint's staging folders (`checkpoint/staging.py`), and deleted as the last pass reads each
layer and when the job ends; one that a killed job left is removed by the next job writing there.
A layer whose tensors safetensors cannot hold as they are (a tensor subclass, a non-contiguous or
shared tensor) is simply converted again on every load.
"""

from __future__ import annotations

import json
import logging
import mmap
import shutil
import struct
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.staging import clean_stale_staging, staging_path
from ..errors import CheckpointError
from .checkpoint_index import DTYPES, read_header

logger = logging.getLogger("optimum_grape")

ALIGNMENT = max(mmap.ALLOCATIONGRANULARITY, 64)  # a page: mappable alone, and torch's own 64-byte alignment
PADDING = "__alignment_padding__."
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# Free disk a scratch leaves besides itself: the pruned checkpoint (at most the model's size) plus slack.
HEADROOM = 1.1


class LayerScratch:
    """Converted decoder layers, one safetensors file each, in a hidden folder beside the output."""

    def __init__(self, output: Path) -> None:
        clean_stale_staging(output)  # the scratch of a job that was killed here before
        self.path = staging_path(output, "scratch")
        self.path.mkdir()
        self._removal = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)  # at exit too
        self._stored: set[int] = set()
        self._full = False
        # One layer written at a time, on a thread, while the layer runs: the write (a second of disk
        # per GB) overlaps the pass instead of adding to it; `settle` waits for it.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="grape-scratch")
        self._pending: Future | None = None

    @classmethod
    def if_room(cls, output, model_bytes: int) -> LayerScratch | None:
        """A scratch beside `output` when its disk has room for the model twice over (the scratch and the
        pruned checkpoint), else None: the job then converts every layer on every load, as it can."""
        output = Path(output)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)  # where the checkpoint goes in any case
            free = shutil.disk_usage(output.parent).free
            if free >= (1 + HEADROOM) * model_bytes:
                return cls(output)
        except OSError as err:  # unreadable or read-only: the job runs without a scratch
            logger.info("No scratch copy of the converted layers beside %s (%s); every pass converts the "
                        "checkpoint's layers again.", output, err)
            return None
        logger.info("No scratch copy of the converted layers: %s has %.2f GB free, under the %.2f GB the copy and "
                    "the pruned checkpoint need; every pass converts the checkpoint's layers again.",
                    output.parent, free / 1e9, (1 + HEADROOM) * model_bytes / 1e9)
        return None

    def _file(self, index: int) -> Path:
        return self.path / f"layer-{index:05d}.safetensors"

    def store(self, index: int, layer: nn.Module) -> None:
        """Start writing a just-converted layer's tensors, on the writer thread, while the layer runs;
        nothing is written when they cannot be read back exactly as they are. The parameters are
        written from the layer's own memory (nothing here changes one in place: merges make new
        tensors), so the layer must stay loaded until `settle` (`Skeleton.release` waits); buffers,
        which a pass may change in place, are written from a copy taken now."""
        self.settle()
        held = layer.state_dict(keep_vars=True)
        state = {name: t.detach() for name, t in held.items()}
        if self._full or not _storable(state):
            return
        state = {name: t if isinstance(held[name], nn.Parameter) else t.clone() for name, t in state.items()}
        self._pending = self._writer.submit(self._write, index, state)

    def _write(self, index: int, state: dict[str, torch.Tensor]) -> None:
        try:
            write_aligned(state, self._file(index))
        except OSError as err:  # the disk filled up since the job started: go on converting
            self._file(index).unlink(missing_ok=True)
            self._full = True
            logger.warning("Could not write the scratch copy of decoder layer %d (%s); the remaining layers are "
                           "converted on every load.", index, err)
            return
        self._stored.add(index)

    def settle(self) -> None:
        """Wait for the layer being written, if any (an error other than a full disk is raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def restore(self, index: int, layer: nn.Module) -> bool:
        """Give `layer` the tensors stored for it (parameters on the meta device replaced, buffers set);
        False when none are stored. The parameters are mapped from the copy, not read into fresh memory:
        its pages are in the page cache from the write, so mapping them is a page-table update where a
        read would copy every byte. Each tensor has a mapping of its own, which goes with the tensor
        (a merge that replaces one expert tensor frees the old one's pages at once, as it would free
        memory of its own). The mappings are private (copy on write): changing a tensor in place never
        reaches the file."""
        self.settle()
        if index not in self._stored:
            return False
        path = self._file(index)
        try:
            start, header = read_header(path)
            tensors = {name: _mapped(path, start + entry["data_offsets"][0], entry)
                       for name, entry in header.items() if name != "__metadata__" and not name.startswith(PADDING)}
        except (OSError, ValueError, KeyError, CheckpointError) as err:  # the copy went missing or bad: convert again
            logger.warning("Cannot read the scratch copy of decoder layer %d (%s); converting it again.", index, err)
            self._stored.discard(index)
            return False
        for name, tensor in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            if leaf in owner._parameters:
                old = owner._parameters[leaf]
                owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            else:  # buffers outlive `release`: memory of their own, no mapping kept alive by one
                owner._buffers[leaf] = tensor.clone()
        return True

    def drop(self, index: int) -> None:
        """Delete a layer's copy once no later pass reads it."""
        self.settle()
        if index in self._stored:
            self._stored.discard(index)
            try:
                self._file(index).unlink(missing_ok=True)
            except OSError:  # still mapped where that forbids deleting (Windows): `close` retries
                pass

    def close(self) -> None:
        try:
            self.settle()
        finally:
            self._writer.shutdown()
            self._stored.clear()
            self._removal()


def write_aligned(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file of `state` whose every tensor starts at a multiple of ALIGNMENT bytes: each
    can be mapped on its own (mappings start at page boundaries), and mapped tensors are aligned as
    torch aligns the tensors it allocates, which matters because MKL's float32 matmuls can change in
    the last bit with the alignment of their operands (tensors mapped at 8-byte alignment gave
    statistics 1e-7 away from the converted layer's). The format allows no holes in its data, so the
    gaps are named uint8 tensors (PADDING...), and the header is padded with spaces, as it allows."""
    entries, offset, order = {}, 0, []
    for name, tensor in state.items():
        gap = -offset % ALIGNMENT
        if gap:
            entries[f"{PADDING}{len(entries)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            order.append(bytes(gap))
            offset += gap
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        order.append(tensor)
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGNMENT)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        for part in order:
            handle.write(part if isinstance(part, bytes) else memoryview(part.reshape(-1).view(torch.uint8).numpy()))


def _mapped(path: Path, offset: int, entry: dict) -> torch.Tensor:
    """The tensor at `offset` of `path` (page-aligned, as `write_aligned` places it), mapped privately."""
    dtype, (begin, end) = DTYPES[entry["dtype"]], entry["data_offsets"]
    if end == begin:
        return torch.empty(entry["shape"], dtype=dtype)
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), end - begin, access=mmap.ACCESS_COPY, offset=offset)
    return torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize).reshape(entry["shape"])


def _storable(state: dict[str, torch.Tensor]) -> bool:
    """Every tensor a plain, contiguous, dense one on the CPU, none sharing memory with another: what
    a safetensors file gives back unchanged, strides included."""
    seen = set()
    for tensor in state.values():
        if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.device.type != "cpu" \
                or tensor.layout != torch.strided or not tensor.is_contiguous() or tensor.dtype not in DTYPE_NAMES:
            return False
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen and tensor.numel():
            return False
        seen.add(pointer)
    return True
