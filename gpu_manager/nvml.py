"""The one place that talks to NVML.

Everything else asks this small class, so tests hand in a fake with the same
four methods instead of needing a GPU.
"""
from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger("gpu_manager")


class NvmlLike(Protocol):
    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def memory(self, index: int) -> tuple[int, int, int]:
        """(used, free, total) in bytes."""
        ...
    def utilization(self, index: int) -> float:
        """GPU utilisation in percent."""
        ...


class Nvml:
    """NVML through `pynvml` (PyPI `nvidia-ml-py`). Raises `NvmlUnavailable` when absent."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise NvmlUnavailable(str(exc)) from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(str(exc)) from exc
        self._nvml = pynvml
        self._lock = threading.Lock()

    def _handle(self, index: int):
        return self._nvml.nvmlDeviceGetHandleByIndex(index)

    def device_count(self) -> int:
        with self._lock:
            return int(self._nvml.nvmlDeviceGetCount())

    def name(self, index: int) -> str:
        with self._lock:
            name = self._nvml.nvmlDeviceGetName(self._handle(index))
        return name.decode() if isinstance(name, bytes) else str(name)

    def memory(self, index: int) -> tuple[int, int, int]:
        with self._lock:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle(index))
        return int(info.used), int(info.free), int(info.total)

    def utilization(self, index: int) -> float:
        with self._lock:
            try:
                rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle(index))
            except self._nvml.NVMLError:
                return 0.0
        return float(rates.gpu)


class NvmlUnavailable(RuntimeError):
    """No NVML library or no driver: the server falls back to simulated or CPU devices."""
