"""Time per allocate/release call, single-threaded and under 8 contending threads.

    python bench/allocation.py [--devices 8] [--calls 200000]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time

from gpu_manager import Allocator, MemoryMonitor, discover


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--calls", type=int, default=100000)
    args = ap.parse_args()
    logging.getLogger("gpu_manager").setLevel(logging.WARNING)  # time the allocator, not the log handler
    inv = discover(simulate=f"{args.devices}x16")
    alloc = Allocator(inv.devices, 4, MemoryMonitor())
    held = [f"h{i}" for i in range(args.devices * 4 - 1)]  # nearly full: the worst case scan
    for cid in held:
        alloc.allocate(cid)
    samples = []
    for i in range(args.calls):
        t0 = time.perf_counter_ns()
        alloc.allocate("x")
        t1 = time.perf_counter_ns()
        alloc.release("x")
        t2 = time.perf_counter_ns()
        samples.append((t1 - t0, t2 - t1))
    alloc_ns = sorted(s[0] for s in samples)
    rel_ns = sorted(s[1] for s in samples)
    q = lambda xs, p: xs[int(p * (len(xs) - 1))] / 1000  # noqa: E731
    print(f"devices={args.devices} calls={args.calls} (single thread, near-full, logging off)")
    print(f"allocate: p50 {q(alloc_ns, .5):.1f} us  p99 {q(alloc_ns, .99):.1f} us  mean {statistics.mean(alloc_ns)/1000:.1f} us")
    print(f"release : p50 {q(rel_ns, .5):.1f} us  p99 {q(rel_ns, .99):.1f} us  mean {statistics.mean(rel_ns)/1000:.1f} us")

    for cid in held:
        alloc.release(cid)
    per_thread = args.calls // 8
    worst = []

    def worker(n: int) -> None:
        mine = []
        for i in range(per_thread):
            t0 = time.perf_counter_ns()
            ok = alloc.allocate(f"{n}-{i}")
            mine.append(time.perf_counter_ns() - t0)
            if ok:
                alloc.release(f"{n}-{i}")
        worst.extend(mine)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worst.sort()
    print(f"8 threads: allocate p50 {q(worst, .5):.1f} us  p99 {q(worst, .99):.1f} us")


if __name__ == "__main__":
    main()
