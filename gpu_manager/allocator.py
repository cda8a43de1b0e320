"""Admission: which device a new connection goes to, and giving the slot back.

The rule is least-loaded first (fewest taken slots, ties to the lowest id) among
devices below their limit. A slot may be *held* rather than live: its connection
is gone and may come back (a stream parked for a resume). Held slots are not
active connections, and when every device is full a new connection takes the
oldest held slot (`on_preempt` is told, so the owner of that slot can release
what it kept). Every verb holds one lock for a few dict operations only, so they
stay far under a millisecond; memory figures for the log lines are read after
the lock is released.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .device import Device, MemoryFigures
from .memory import MemoryMonitor

log = logging.getLogger("gpu_manager")


@dataclass(frozen=True)
class DeviceLoad:
    device: Device
    active: int  # live connections
    limit: int
    held: int = 0  # slots held for connections that may come back (a new connection may take them)

    @property
    def free(self) -> int:
        """Slots a new connection could take, held ones included (none while over a lowered limit)."""
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
        self._active: dict[int, set[str]] = {d.id: set() for d in self.devices}  # every taken slot
        self._owner: dict[str, Device] = {}
        self._held: dict[str, Device] = {}  # held slots, oldest first (dicts keep insertion order)
        # Called (outside the lock) with the id of a held slot a new connection took.
        self.on_preempt: Callable[[str], None] | None = None

    # -- the verbs -----------------------------------------------------
    def allocate(self, connection_id: str) -> Device | None:
        """A device with room for this connection, or None when all are full (logged either way).
        A free slot first; when there is none, the oldest held slot."""
        preempted: tuple[str, Device, int] | None = None
        with self._lock:
            if connection_id in self._owner:
                return self._owner[connection_id]
            best: Device | None = None
            for d in self.devices:
                n = len(self._active[d.id])
                if n < self._limits[d.id] and (best is None or n < len(self._active[best.id])):
                    best = d
            oldest = best is None and next(
                (c for c, d in self._held.items() if self._live(d.id) < self._limits[d.id]), None)
            if oldest:
                best = self._drop(oldest)
                preempted = (oldest, best, self._live(best.id))
            if best is not None:
                self._active[best.id].add(connection_id)
                self._owner[connection_id] = best
                load = self._live(best.id)
            else:
                total = len(self._owner) - len(self._held)
        if preempted is not None:
            self._log_release(*preempted)
            if self.on_preempt is not None:
                self.on_preempt(preempted[0])
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

    def hold(self, connection_id: str) -> None:
        """The connection is gone but may come back: its slot stays taken until `unhold` or `release`,
        unless a new connection needs it first."""
        with self._lock:
            device = self._owner.get(connection_id)
            if device is not None:
                self._held.pop(connection_id, None)
                self._held[connection_id] = device

    def unhold(self, connection_id: str) -> bool:
        """The connection came back to its held slot: live again. False if the slot was taken meanwhile."""
        with self._lock:
            if connection_id not in self._owner:
                return False
            self._held.pop(connection_id, None)
            return True

    def release(self, connection_id: str) -> Device | None:
        """Give the slot back. Releasing twice (or an unknown id) is a no-op returning None."""
        with self._lock:
            if connection_id not in self._owner:
                return None
            device = self._drop(connection_id)
            remaining = self._live(device.id)
        self._log_release(connection_id, device, remaining)
        return device

    def _drop(self, connection_id: str) -> Device:
        """(Under the lock.) Free a taken slot."""
        device = self._owner.pop(connection_id)
        self._held.pop(connection_id, None)
        self._active[device.id].discard(connection_id)
        return device

    def _live(self, device_id: int) -> int:
        """(Under the lock.) Live connections of a device: its taken slots less the held ones."""
        return len(self._active[device_id]) - sum(1 for d in self._held.values() if d.id == device_id)

    def _log_release(self, connection_id: str, device: Device, remaining: int) -> None:
        mem = self.memory.figures(device)
        log.info(
            "Released GPU %d from connection %s (Remaining: %d connections, Memory: %s GB)",
            device.id, connection_id, remaining, _mem(mem),
        )

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
        """Live connections of the device (held slots are not)."""
        with self._lock:
            return self._live(device_id)

    def held(self, device_id: int) -> int:
        with self._lock:
            return sum(1 for d in self._held.values() if d.id == device_id)

    def total_active(self) -> int:
        with self._lock:
            return len(self._owner) - len(self._held)

    def has_room(self) -> bool:
        """Whether a new connection would be admitted (a held slot counts as room)."""
        with self._lock:
            return any(self._live(d.id) < self._limits[d.id] for d in self.devices)

    def device_of(self, connection_id: str) -> Device | None:
        with self._lock:
            return self._owner.get(connection_id)

    def loads(self) -> list[DeviceLoad]:
        with self._lock:
            return [DeviceLoad(d, self._live(d.id), self._limits[d.id], len(self._active[d.id]) - self._live(d.id))
                    for d in self.devices]


def _mem(m: MemoryFigures) -> str:
    """`used/total` as the contract's log lines write it: one decimal, then two."""
    return f"{MemoryFigures.gb(m.used_bytes):.1f}/{MemoryFigures.gb(m.total_bytes):.2f}"
