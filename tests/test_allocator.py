"""Admission: least-loaded device, limits, release, thread safety, and the contract's log lines."""
from __future__ import annotations

import logging
import re
import threading

import pytest

from gpu_manager import GIB, Allocator, Device, MemoryMonitor, discover
from tests.fakes import FakeNvml


def four_fake_gpus() -> tuple[list[Device], MemoryMonitor]:
    inv = discover(nvml_factory=lambda: FakeNvml(4, 16.0))
    return inv.devices, MemoryMonitor(inv.nvml)


def four_simulated() -> tuple[list[Device], MemoryMonitor]:
    inv = discover(simulate="4x16")
    return inv.devices, MemoryMonitor(inv.nvml)


@pytest.mark.parametrize("make", [four_fake_gpus, four_simulated], ids=["fake-nvml", "simulated"])
def test_sixteen_connections_round_robin_then_full(make):
    devices, memory = make()
    alloc = Allocator(devices, 4, memory)
    got = [alloc.allocate(f"c{i}").id for i in range(16)]
    assert got == [0, 1, 2, 3] * 4
    assert alloc.allocate("c16") is None
    alloc.release("c5")  # was on device 1
    assert alloc.allocate("c17").id == 1
    assert alloc.allocate("c18") is None


def test_release_is_idempotent_and_unknown_ids_are_ignored():
    devices, memory = four_simulated()
    alloc = Allocator(devices, 1, memory)
    d = alloc.allocate("a")
    assert alloc.release("a") == d
    assert alloc.release("a") is None
    assert alloc.release("never-seen") is None
    assert alloc.total_active() == 0


def test_least_loaded_wins_and_ties_go_to_lowest_id():
    devices, memory = four_simulated()
    alloc = Allocator(devices, 4, memory)
    for i in range(8):
        alloc.allocate(f"c{i}")  # two on each
    alloc.release("c2")  # device 2 now has one
    assert alloc.allocate("x").id == 2
    assert alloc.allocate("y").id == 0


def test_concurrent_allocate_release_never_over_admits():
    devices, memory = four_simulated()
    alloc = Allocator(devices, 4, memory)
    over = []
    barrier = threading.Barrier(32)

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(200):
            cid = f"t{n}-{i}"
            d = alloc.allocate(cid)
            loads = alloc.loads()
            if any(x.active > x.limit for x in loads) or alloc.total_active() > 16:
                over.append(loads)
            if d is not None:
                alloc.release(cid)

    logging.getLogger("gpu_manager").setLevel(logging.WARNING)
    try:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        logging.getLogger("gpu_manager").setLevel(logging.NOTSET)
    assert not over
    assert alloc.total_active() == 0


def test_log_lines_are_the_contracts(caplog):
    devices, memory = four_fake_gpus()  # NVML says 0.5 GB used of 16
    alloc = Allocator(devices[:1], 1, memory)
    caplog.set_level(logging.INFO, logger="gpu_manager")
    cid = "3f1c2a9e-5d7b-4c1e-9a51-0f6f2b8d7e10"
    alloc.allocate(cid)
    alloc.allocate("other")
    alloc.release(cid)
    lines = [r.getMessage() for r in caplog.records if r.name == "gpu_manager"]
    assert lines == [
        f"Allocated GPU 0 to connection {cid} (Load: 1/1, Memory: 0.5/16.00 GB)",
        "Rejected connection other: No GPU resources available (1/1 connections)",
        f"Released GPU 0 from connection {cid} (Remaining: 0 connections, Memory: 0.5/16.00 GB)",
    ]


def test_simulated_memory_counts_models_and_streams():
    inv = discover(simulate="2x8")
    memory = MemoryMonitor()
    memory.account.set_model_bytes(1, 3 * GIB)
    memory.account.add_stream(1, "a", GIB // 2)
    fig = memory.figures(inv.by_id(1))
    assert (fig.used_bytes, fig.total_bytes, fig.free_bytes) == (int(3.5 * GIB), 8 * GIB, int(4.5 * GIB))
    memory.account.remove_stream(1, "a")
    assert memory.figures(inv.by_id(1)).used_bytes == 3 * GIB
    assert memory.figures(inv.by_id(0)).used_bytes == 0


def test_inventory_sources():
    assert [d.kind for d in discover(simulate="3x4").devices] == ["simulated"] * 3
    real = discover(nvml_factory=lambda: FakeNvml(2, 16.0))
    assert [(d.label, d.kind) for d in real.devices] == [("cuda:0", "cuda"), ("cuda:1", "cuda")]
    assert discover(simulate="4x16", gpus=[1, 3]).devices[1].id == 3
    from gpu_manager import NvmlUnavailable

    def no_nvml():
        raise NvmlUnavailable("no driver")

    cpu = discover(nvml_factory=no_nvml).devices
    assert len(cpu) == 1 and cpu[0].label == "cpu" and cpu[0].id == 0
    with pytest.raises(ValueError, match="NxG"):
        discover(simulate="four")
    with pytest.raises(ValueError):
        discover(simulate="2x8", gpus=[5])


def test_real_nvml_absent_here_falls_back_to_cpu():
    """On a machine without a driver, pynvml raises and we serve on the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a real GPU is present")
    devices = discover().devices
    assert [d.kind for d in devices] == ["cpu"]
    assert re.fullmatch(r"cpu", devices[0].label)


def test_a_full_device_gives_its_oldest_held_slot_to_a_new_connection(caplog):
    devices, memory = four_simulated()
    alloc = Allocator(devices[:1], 2, memory)
    taken = []
    alloc.on_preempt = taken.append
    alloc.allocate("a")
    alloc.allocate("b")
    alloc.hold("b")
    alloc.hold("a")  # a was held after b: b is the oldest held slot
    assert (alloc.active(0), alloc.held(0), alloc.total_active(), alloc.has_room()) == (0, 2, 0, True)
    with caplog.at_level(logging.INFO, logger="gpu_manager"):
        assert alloc.allocate("c").id == 0
    assert taken == ["b"]
    assert any(r.getMessage().startswith("Released GPU 0 from connection b (Remaining: 0 connections")
               for r in caplog.records)
    assert alloc.release("b") is None  # already given away: releasing it again frees nothing
    assert alloc.unhold("b") is False
    assert alloc.unhold("a") is True  # its client came back: live again, no longer takeable
    assert (alloc.active(0), alloc.held(0)) == (2, 0)
    assert alloc.allocate("d") is None and taken == ["b"]


def test_a_held_slot_on_a_device_over_its_lowered_limit_is_not_given_away():
    devices, memory = four_simulated()
    alloc = Allocator(devices[:1], 3, memory)
    for c in "abc":
        alloc.allocate(c)
    alloc.hold("c")
    alloc.set_limit(0, 2)  # two live connections already fill the lowered limit
    assert alloc.allocate("d") is None
    assert alloc.held(0) == 1
