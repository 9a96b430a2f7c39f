"""return_free_memory hands freed heap back to the OS: resident memory drops by what was freed."""

import subprocess
import sys

import pytest

from optimum_grape.runtime.memory import _trim, return_free_memory

# Run in a fresh process: how glibc serves these blocks depends on the allocator's history (its
# mmap threshold, the arenas other threads used), which a long test session has changed.
FREED_AND_HANDED_BACK = """
import torch
from optimum_grape.runtime.memory import return_free_memory

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096

# A 24 MiB block, mapped and unmapped, raises glibc's mmap threshold: the 8 MiB tensors after it come
# from the heap, as a layer's temporaries do. Small live blocks between them keep the heap from
# shrinking by itself, so the freed 192 MiB stay resident until they are handed back.
torch.empty(24 << 20, dtype=torch.uint8).fill_(1)
blocks, live = [], []
for _ in range(24):
    blocks.append(torch.ones(8 << 20, dtype=torch.uint8))
    live.append(torch.ones(64 << 10, dtype=torch.uint8))
del blocks
before = rss()
return_free_memory()
print(before - rss(), sum(int(t.sum()) for t in live))
"""


@pytest.mark.skipif(_trim() is None, reason="malloc_trim is glibc's")
def test_freed_heap_blocks_are_handed_back():
    result = subprocess.run([sys.executable, "-c", FREED_AND_HANDED_BACK], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    handed_back, live = map(int, result.stdout.split())
    assert handed_back > 96 << 20, f"only {handed_back >> 20} MiB of 192 MiB of freed heap went back to the OS"
    assert live == 24 * (64 << 10)


def test_can_be_called_any_time():
    return_free_memory()
    return_free_memory()
