"""What a device is, as a plain value.

A `Device` carries no handles and no locks, so tests build them freely and the
rest of the server can pass them around and compare them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DeviceKind = Literal["cuda", "simulated", "cpu"]

GIB = 2**30


@dataclass(frozen=True)
class Device:
    """One place models can run: a CUDA GPU, a simulated GPU, or the CPU.

    `id` is what clients see as `gpu_id`; `torch_device` is where tensors go
    (simulated devices put their models on the CPU).
    """

    id: int
    torch_device: str
    total_bytes: int
    kind: DeviceKind
    name: str = ""

    @property
    def label(self) -> str:
        """The `device` field of the protocol: `cuda:N`, or `cpu` for the CPU fallback."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.id}"


@dataclass(frozen=True)
class MemoryFigures:
    """A device's memory as an operator reads it, in bytes, plus utilisation."""

    used_bytes: int
    free_bytes: int
    total_bytes: int
    utilization_percent: float = 0.0

    @staticmethod
    def gb(n_bytes: int) -> float:
        return n_bytes / GIB
