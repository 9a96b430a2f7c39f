"""return_free_memory hands freed heap back to the OS: resident memory drops by what was freed."""

import ctypes
import ctypes.util
import sys

import pytest
import torch

from optimum_grape.runtime.memory import return_free_memory


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def _glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim")
    except OSError:
        return False


@pytest.mark.skipif(not _glibc(), reason="malloc_trim is glibc's")
def test_freed_heap_blocks_are_handed_back():
    # A 24 MiB block, mapped and unmapped, raises glibc's mmap threshold: the 8 MiB tensors after it
    # come from the heap, as a layer's temporaries do. Small live blocks between them keep the heap
    # from shrinking by itself, so the freed 192 MiB stay resident until they are handed back.
    torch.empty(24 << 20, dtype=torch.uint8).fill_(1)
    blocks, live = [], []
    for _ in range(24):
        blocks.append(torch.ones(8 << 20, dtype=torch.uint8))
        live.append(torch.ones(64 << 10, dtype=torch.uint8))
    del blocks
    before = _rss()
    return_free_memory()
    assert before - _rss() > 96 << 20, "less than half of 192 MiB of freed heap went back to the OS"
    assert sum(int(t.sum()) for t in live) == 24 * (64 << 10)


def test_can_be_called_any_time():
    return_free_memory()
    return_free_memory()
