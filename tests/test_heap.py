"""The server gives freed heap memory back to the system (streamserver/ops/heap.py)."""
from __future__ import annotations

import ctypes

import pytest

from streamserver.ops import heap


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(heap._trim is None, reason="not glibc")
def test_trimming_returns_memory_freed_inside_the_heap():
    """Many small blocks freed around a few kept ones leave the heap's pages free but held: the process
    keeps them until the trim hands them back."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(60_000) for _ in range(3000)]  # 180 MB under the mmap threshold: in the heap
    for b in blocks:
        ctypes.memset(b, 1, 60_000)  # touched: resident
    keep = blocks[::500]  # a few blocks still in use pin the heap's top
    for b in blocks:
        if b not in keep:
            libc.free(b)
    before = rss_kb()
    assert heap.trim() is True
    after = rss_kb()
    for b in keep:
        libc.free(b)
    assert before - after > 100_000  # kB: most of the freed 180 MB went back
