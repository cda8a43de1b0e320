"""Which devices this server may use, found once at start-up.

Three sources, in order: `--simulate-gpus NxG`, NVML's real CUDA devices, and
the CPU as a single device when there is neither.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from .device import GIB, Device
from .nvml import Nvml, NvmlLike, NvmlUnavailable

log = logging.getLogger("gpu_manager")


@dataclass(frozen=True)
class SimulatedSpec:
    count: int
    gigabytes: float


def parse_simulate(spec: str) -> SimulatedSpec:
    """Parse `NxG` (e.g. `4x16`, `2x7.5`): N devices of G GB each."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+(?:\.\d+)?)\s*", spec)
    if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
        raise ValueError(f"--simulate-gpus expects NxG, e.g. 4x16; got {spec!r}")
    return SimulatedSpec(int(m.group(1)), float(m.group(2)))


def machine_total_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Inventory:
    """The devices, plus the NVML handle used for their live figures (None when not real GPUs)."""

    devices: list[Device]
    nvml: NvmlLike | None = None

    @property
    def simulated(self) -> bool:
        return any(d.kind == "simulated" for d in self.devices)

    def by_id(self, device_id: int) -> Device:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise KeyError(device_id)


def discover(
    simulate: str | None = None,
    gpus: list[int] | None = None,
    nvml_factory: Callable[[], NvmlLike] = Nvml,
) -> Inventory:
    """Find the devices. `gpus` restricts real or simulated devices to those ids."""
    if simulate:
        spec = parse_simulate(simulate)
        devices = [
            Device(i, "cpu", int(spec.gigabytes * GIB), "simulated", f"Simulated GPU {i} ({spec.gigabytes:g} GB)")
            for i in range(spec.count)
        ]
        return Inventory(_select(devices, gpus))
    try:
        nvml = nvml_factory()
        count = nvml.device_count()
    except NvmlUnavailable as exc:
        log.info("NVML unavailable (%s); using the CPU", exc)
        count, nvml = 0, None
    if count and nvml is not None:
        devices = [Device(i, f"cuda:{i}", nvml.memory(i)[2], "cuda", nvml.name(i)) for i in range(count)]
        return Inventory(_select(devices, gpus), nvml)
    return Inventory([Device(0, "cpu", machine_total_bytes(), "cpu", "CPU")])


def _select(devices: list[Device], gpus: list[int] | None) -> list[Device]:
    if gpus is None:
        return devices
    known = {d.id for d in devices}
    missing = [g for g in gpus if g not in known]
    if missing:
        raise ValueError(f"--gpus names devices that do not exist: {missing} (have {sorted(known)})")
    return [d for d in devices if d.id in set(gpus)]
