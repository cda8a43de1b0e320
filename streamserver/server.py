"""The server's long-lived parts, built once: devices, allocator, one runtime per device,
the metrics and the drain state.

Held on the Starlette app (`app.state.server`), never in a module global.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from gpu_manager import Allocator, Inventory, MemoryMonitor, discover
from gpu_manager.device import MemoryFigures
from gpu_manager.nvml import Nvml

from .config import ServerConfig
from .drain import Drain
from .metrics import Metrics
from .runtime import DeviceRuntime, ModelLoader

log = logging.getLogger("streamserver")


@dataclass
class Server:
    config: ServerConfig
    inventory: Inventory
    allocator: Allocator
    memory: MemoryMonitor
    runtimes: dict[int, DeviceRuntime]
    metrics: Metrics
    drain: Drain

    @classmethod
    def build(cls, config: ServerConfig, loader: ModelLoader | None = None, nvml_factory=Nvml) -> "Server":
        if loader is None:
            from .models import make_loader

            loader = make_loader(config)
        inventory = discover(config.simulate_gpus, list(config.gpus) if config.gpus else None, nvml_factory)
        memory = MemoryMonitor(inventory.nvml)
        limit = config.max_connections_per_gpu
        if not isinstance(limit, int):
            raise ValueError("--max-connections-per-gpu auto is not supported yet; give a number")
        allocator = Allocator(inventory.devices, limit, memory)
        metrics = Metrics(allocator, memory)
        runtimes = {
            d.id: DeviceRuntime(d, loader, config.idle_unload_seconds, memory.account, metrics, config.max_batch)
            for d in inventory.devices
        }
        for d in inventory.devices:
            log.info("Device %d: %s (%s, %.2f GB)", d.id, d.name, d.label, d.total_bytes / 2**30)
        return cls(config, inventory, allocator, memory, runtimes, metrics, Drain())

    def gpu_entry(self, device_id: int) -> dict:
        load = next(x for x in self.allocator.loads() if x.device.id == device_id)
        mem = self.memory.figures(load.device)
        runtime = self.runtimes[device_id]
        return {
            "gpu_id": device_id,
            "device": load.device.label,
            "name": load.device.name,
            "active_connections": load.active,
            "max_connections": load.limit,
            "allocated_memory_gb": round(MemoryFigures.gb(mem.used_bytes), 2),
            "free_memory_gb": round(MemoryFigures.gb(mem.free_bytes), 2),
            "total_memory_gb": round(MemoryFigures.gb(mem.total_bytes), 2),
            "utilization_percent": round(mem.utilization_percent, 1),
            "models_loaded": runtime.models is not None,
            "models": runtime.model_names,
        }

    def gpu_status(self) -> dict:
        return {
            "total_gpus": len(self.inventory.devices),
            "total_connections": self.allocator.total_active(),
            "max_connections_per_gpu": self.config.max_connections_per_gpu,
            "simulated": self.inventory.simulated,
            "draining": self.drain.draining,
            "gpus": [self.gpu_entry(d.id) for d in self.inventory.devices],
        }

    def readiness(self) -> str | None:
        """None when a new stream would be admitted, else why not: `draining` or `full`."""
        if self.drain.draining:
            return "draining"
        return None if self.allocator.has_room() else "full"

    def shutdown(self) -> None:
        for runtime in self.runtimes.values():
            runtime.shutdown()
