"""Memory figures per device, by the device's kind.

Real GPUs report NVML's used/free/total. Simulated GPUs have no driver to ask,
so their "used" is what the server accounts to them: the bytes of the models
loaded there plus the bytes each live connection's state takes. The CPU device
reports this process's resident memory against the machine's total.
"""
from __future__ import annotations

import os
import threading
from collections import defaultdict

from .device import Device, MemoryFigures
from .nvml import NvmlLike


class MemoryAccount:
    """Bytes the server itself puts on each device (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[int, int] = defaultdict(int)
        self._streams: dict[int, dict[str, int]] = defaultdict(dict)

    def set_model_bytes(self, device_id: int, n_bytes: int) -> None:
        with self._lock:
            self._models[device_id] = n_bytes

    def add_stream(self, device_id: int, connection_id: str, n_bytes: int) -> None:
        with self._lock:
            self._streams[device_id][connection_id] = n_bytes

    def remove_stream(self, device_id: int, connection_id: str) -> None:
        with self._lock:
            self._streams[device_id].pop(connection_id, None)

    def used(self, device_id: int) -> int:
        with self._lock:
            return self._models[device_id] + sum(self._streams[device_id].values())


def process_rss_bytes() -> int:
    """Resident set size of this process, from /proc (no psutil needed)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryMonitor:
    """Answers `figures(device)` for any kind of device."""

    def __init__(self, nvml: NvmlLike | None = None, account: MemoryAccount | None = None) -> None:
        self.nvml = nvml
        self.account = account or MemoryAccount()

    def figures(self, device: Device) -> MemoryFigures:
        if device.kind == "cuda" and self.nvml is not None:
            used, free, total = self.nvml.memory(device.id)
            return MemoryFigures(used, free, total, self.nvml.utilization(device.id))
        if device.kind == "simulated":
            used = min(self.account.used(device.id), device.total_bytes)
            return MemoryFigures(used, device.total_bytes - used, device.total_bytes)
        used = process_rss_bytes()
        return MemoryFigures(used, max(device.total_bytes - used, 0), device.total_bytes)
