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


HELD_AFTER_FREE = r"""
import ctypes, sys
from streamserver.ops import heap
if sys.argv[1] == "bounded":
    assert heap.bound_heaps()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
big = libc.malloc(8 << 20); libc.free(big)  # a large buffer came and went (glibc then raises its threshold)
blocks, pins = [], []
for _ in range(60):
    blocks.append(libc.malloc(2 << 20)); ctypes.memset(blocks[-1], 1, 2 << 20)
    pins.append(libc.malloc(200_000)); ctypes.memset(pins[-1], 1, 64)  # smaller blocks between them
before = rss()
for b in blocks:
    libc.free(b)
print(before - rss())
"""


@pytest.mark.skipif(heap._trim is None, reason="not glibc")
def test_large_buffers_go_back_to_the_system_when_freed():
    """After `bound_heaps`, 2-MB buffers (a window's activations) return to the system as they are
    freed, even once an 8-MB one has come and gone; glibc's own adaptive threshold would keep them
    in the heap, held there by the blocks allocated between them."""
    import subprocess
    import sys

    def freed_kb(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", HELD_AFTER_FREE, mode], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.strip())

    assert freed_kb("bounded") > 100_000  # of 120 MB
    assert freed_kb("default") < 20_000
