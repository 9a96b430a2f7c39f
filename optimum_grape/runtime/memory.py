"""Giving memory the process freed back to the operating system, so that peak resident memory
tracks what is alive: a model is pruned one layer at a time to keep that peak near the model's size.

glibc serves a large allocation from its own mapping and unmaps it when freed, but after such a
block is freed it raises its mmap threshold (up to 32 MiB), so later layer-sized temporaries come
from the heap and stay resident after they are freed. `malloc_trim(0)` returns the free heap to the
OS; called after each layer is freed, after each layer is loaded (a checkpoint's per-expert tensors,
fused into one and freed), after each candidate plan's layer is restored, and after each large
neuron alignment (float64 features and [I, I] cosines, the largest temporaries of merging), it keeps a
layer-at-a-time pass near one layer's worth of temporaries. On the 20-layer benchmark model (4.5 GB),
layer by layer, trimming only per layer let the peak reach 1.60 GB; trimming after each alignment
too, 1.43 GB, for about 3% more CPU time; trimming after each load as well, with alignments that
hold no normalised or negated copies and one member's aligned rows at a time
(`adapters/alignment.py`), 1.33 GB. (Setting a fixed, low mmap threshold instead would make every
temporary a fresh, zeroed mapping: about a quarter slower on a layer-by-layer job.) Linux/glibc
only; a no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # absent from musl


def return_free_memory() -> None:
    """Hand the allocator's free memory back to the OS (see the module docstring)."""
    trim = _trim()
    if trim is not None:
        trim(0)
