"""Admission: which device a new connection goes to, and giving the slot back.

The rule is least-loaded first (fewest active connections, ties to the lowest
id) among devices below their limit. Both verbs hold one lock for a few dict
operations only, so they stay far under a millisecond; memory figures for the
log lines are read after the lock is released.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from .device import Device, MemoryFigures
from .memory import MemoryMonitor

log = logging.getLogger("gpu_manager")


@dataclass(frozen=True)
class DeviceLoad:
    device: Device
    active: int
    limit: int

    @property
    def free(self) -> int:
        """Slots a new connection could take (none while over a lowered limit)."""
        return max(0, self.limit - self.active)


class Allocator:
    """Tracks which connection holds a slot on which device."""

    def __init__(
        self,
        devices: list[Device],
        max_per_device: int | dict[int, int],
        memory: MemoryMonitor | None = None,
    ) -> None:
        if not devices:
            raise ValueError("no devices to allocate from")
        self.devices = sorted(devices, key=lambda d: d.id)
        self._limits = {
            d.id: (max_per_device[d.id] if isinstance(max_per_device, dict) else max_per_device)
            for d in self.devices
        }
        self.memory = memory or MemoryMonitor()
        self._lock = threading.Lock()
        self._active: dict[int, set[str]] = {d.id: set() for d in self.devices}
        self._owner: dict[str, Device] = {}

    # -- the two verbs -------------------------------------------------
    def allocate(self, connection_id: str) -> Device | None:
        """A device with room for this connection, or None when all are full (logged either way)."""
        with self._lock:
            if connection_id in self._owner:
                return self._owner[connection_id]
            best: Device | None = None
            for d in self.devices:
                n = len(self._active[d.id])
                if n < self._limits[d.id] and (best is None or n < len(self._active[best.id])):
                    best = d
            if best is not None:
                self._active[best.id].add(connection_id)
                self._owner[connection_id] = best
                load = len(self._active[best.id])
            else:
                total = sum(len(s) for s in self._active.values())
        if best is None:
            log.info(
                "Rejected connection %s: No GPU resources available (%d/%d connections)",
                connection_id, total, self.capacity,
            )
            return None
        mem = self.memory.figures(best)
        log.info(
            "Allocated GPU %d to connection %s (Load: %d/%d, Memory: %s GB)",
            best.id, connection_id, load, self._limits[best.id], _mem(mem),
        )
        return best

    def release(self, connection_id: str) -> Device | None:
        """Give the slot back. Releasing twice (or an unknown id) is a no-op returning None."""
        with self._lock:
            device = self._owner.pop(connection_id, None)
            if device is None:
                return None
            self._active[device.id].discard(connection_id)
            remaining = len(self._active[device.id])
        mem = self.memory.figures(device)
        log.info(
            "Released GPU %d from connection %s (Remaining: %d connections, Memory: %s GB)",
            device.id, connection_id, remaining, _mem(mem),
        )
        return device

    # -- read-only views -----------------------------------------------
    @property
    def capacity(self) -> int:
        return sum(self._limits.values())

    def limit(self, device_id: int) -> int:
        return self._limits[device_id]

    def set_limit(self, device_id: int, limit: int) -> None:
        """Change one device's limit (`--max-connections-per-gpu auto`, once its models are measured).
        Connections already admitted stay; a lower limit only stops new ones."""
        with self._lock:
            self._limits[device_id] = max(1, int(limit))

    def active(self, device_id: int) -> int:
        with self._lock:
            return len(self._active[device_id])

    def total_active(self) -> int:
        with self._lock:
            return len(self._owner)

    def has_room(self) -> bool:
        with self._lock:
            return any(len(self._active[d.id]) < self._limits[d.id] for d in self.devices)

    def device_of(self, connection_id: str) -> Device | None:
        with self._lock:
            return self._owner.get(connection_id)

    def loads(self) -> list[DeviceLoad]:
        with self._lock:
            return [DeviceLoad(d, len(self._active[d.id]), self._limits[d.id]) for d in self.devices]


def _mem(m: MemoryFigures) -> str:
    """`used/total` as the contract's log lines write it: one decimal, then two."""
    return f"{MemoryFigures.gb(m.used_bytes):.1f}/{MemoryFigures.gb(m.total_bytes):.2f}"
