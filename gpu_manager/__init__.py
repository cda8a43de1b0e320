"""Devices, allocation and memory figures. Knows nothing of WebSockets or Whisper."""
from .allocator import Allocator, DeviceLoad
from .device import GIB, Device, MemoryFigures
from .inventory import Inventory, discover, parse_simulate
from .memory import MemoryAccount, MemoryMonitor
from .nvml import Nvml, NvmlLike, NvmlUnavailable

__all__ = [
    "Allocator", "DeviceLoad", "Device", "GIB", "MemoryFigures", "Inventory", "discover",
    "parse_simulate", "MemoryAccount", "MemoryMonitor", "Nvml", "NvmlLike", "NvmlUnavailable",
]
