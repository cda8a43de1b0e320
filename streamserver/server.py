"""The server's long-lived parts, built once: devices, allocator, one runtime per device,
the metrics and the drain state.

Held on the Starlette app (`app.state.server`), never in a module global.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from gpu_manager import Allocator, Inventory, MemoryMonitor, discover
from gpu_manager.device import Device, MemoryFigures
from gpu_manager.nvml import Nvml

from .config import ServerConfig, default_jobs_db
from .ops.drain import Drain
from .ops.metrics import Metrics
from .jobs.runner import JobRunner
from .live.resume import Resumes
from .live.viewers import Viewers
from .engine.runtime import DeviceRuntime, ModelLoader

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
    jobs: JobRunner | None = None  # file transcription jobs (set by build)
    resumes: Resumes | None = None  # live streams whose client dropped, waiting for it (set by build)
    viewers: Viewers | None = None  # the live streams an audience may watch (set by build)

    @classmethod
    def build(cls, config: ServerConfig, loader: ModelLoader | None = None, nvml_factory=Nvml) -> "Server":
        if loader is None:
            from .engine.models import make_loader

            loader = make_loader(config)
        inventory = discover(config.simulate_gpus, list(config.gpus) if config.gpus else None, nvml_factory)
        memory = MemoryMonitor(inventory.nvml)
        if config.policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, not {config.policy!r}")
        if config.refuse_when_full not in REFUSALS:
            raise ValueError(f"--refuse-when-full must be one of {', '.join(REFUSALS)}, not {config.refuse_when_full!r}")
        limit = config.max_connections_per_gpu
        auto = limit == "auto"
        if not auto and not isinstance(limit, int):
            raise ValueError(f"--max-connections-per-gpu must be a number or auto, not {limit!r}")
        # With auto, a device admits AUTO_START connections until its models have loaded and the
        # memory one stream needs has been measured; then its limit is derived from that figure.
        allocator = Allocator(inventory.devices, AUTO_START if auto else limit, memory)
        metrics = Metrics(allocator, memory)
        runtimes = {
            d.id: DeviceRuntime(d, loader, config.idle_unload_seconds, memory.account, metrics, config.max_batch)
            for d in inventory.devices
        }
        for d in inventory.devices:  # a device full of live connections runs no file work
            runtimes[d.id].scheduler.is_full = partial(_device_full, allocator, d.id)
            runtimes[d.id].scheduler.live_streams = partial(allocator.active, d.id)
        if auto:
            for d in inventory.devices:
                runtimes[d.id].on_loaded = partial(_derive_limit, allocator, memory, d, config.gpu_memory_fraction)
        for d in inventory.devices:
            log.info("Device %d: %s (%s, %.2f GB)", d.id, d.name, d.label, d.total_bytes / 2**30)
        server = cls(config, inventory, allocator, memory, runtimes, metrics, Drain())
        server.jobs = JobRunner(server, config.jobs_db or default_jobs_db(), lease_seconds=config.job_lease_seconds)
        server.jobs.check()
        server.resumes = Resumes(config.resume_seconds, allocator)
        server.viewers = Viewers(config.max_viewers_per_stream)
        metrics.viewers = server.viewers.count
        return server

    def gpu_entry(self, device_id: int) -> dict:
        load = next(x for x in self.allocator.loads() if x.device.id == device_id)
        mem = self.memory.figures(load.device)
        runtime = self.runtimes[device_id]
        return {
            "gpu_id": device_id,
            "device": load.device.label,
            "name": load.device.name,
            "active_connections": load.active,
            "held_for_resume": load.held,
            "viewers": self.viewers.count(device_id) if self.viewers else 0,
            "max_connections": load.limit,
            "free_slots": 0 if self.drain.draining else load.free,
            "allocated_memory_gb": round(MemoryFigures.gb(mem.used_bytes), 2),
            "free_memory_gb": round(MemoryFigures.gb(mem.free_bytes), 2),
            "total_memory_gb": round(MemoryFigures.gb(mem.total_bytes), 2),
            "utilization_percent": round(mem.utilization_percent, 1),
            "models_loaded": runtime.models is not None,
            "models": runtime.model_names,
            "batch_share": round(runtime.scheduler.batch_share(), 3),
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

    def slots(self) -> tuple[int, int]:
        """(free, total) connection slots over every device: the headroom a balancer or an
        autoscaler acts on. A draining server has none free."""
        loads = self.allocator.loads()
        free = 0 if self.drain.draining else sum(x.free for x in loads)
        return free, sum(x.limit for x in loads)

    def readiness(self) -> str | None:
        """None when a new stream would be admitted, else why not: `draining` or `full`."""
        if self.drain.draining:
            return "draining"
        return None if self.allocator.has_room() else "full"

    def shutdown(self) -> None:
        for runtime in self.runtimes.values():
            runtime.shutdown()


AUTO_START = 4
POLICIES = ("localagreement", "alignatt")
REFUSALS = ("close", "http")  # --refuse-when-full


def auto_limit(total_bytes: int, used_bytes: int, stream_bytes: int, fraction: float) -> int:
    """Connections that fit in `fraction` of the device beside what is already used (the weights)."""
    room = total_bytes * fraction - used_bytes
    return max(1, int(room // max(stream_bytes, 1)))


def _device_full(allocator: Allocator, device_id: int) -> bool:
    return allocator.active(device_id) >= allocator.limit(device_id)


def _derive_limit(allocator: Allocator, memory: MemoryMonitor, device: Device, fraction: float, models) -> None:
    used = memory.figures(device).used_bytes if device.kind == "cuda" else models.model_bytes
    limit = auto_limit(device.total_bytes, used, models.stream_bytes, fraction)
    allocator.set_limit(device.id, limit)
    log.info("GPU %d: %d connections fit in %.0f%% of %.2f GB at %.1f MB per stream (measured)",
             device.id, limit, fraction * 100, device.total_bytes / 2**30, models.stream_bytes / 2**20)
