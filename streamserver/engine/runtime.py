"""DeviceRuntime: one device's shared models and the single worker thread that runs them.

Models load lazily on the first connection (later arrivals wait for the same
load), are shared by all of that device's connections, and are dropped after
`idle_unload_seconds` without a connection. All inference for the device runs
on its one worker thread, never on the event loop; its `scheduler` batches the
connections' work into rounds on that thread.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from gpu_manager import Device, MemoryAccount

from ..errors import GpuOutOfMemory, ModelLoadFailed, is_out_of_memory
from .scheduler import DeviceScheduler

if TYPE_CHECKING:
    from ..ops.metrics import Metrics

log = logging.getLogger("streamserver.engine.runtime")
T = TypeVar("T")


@dataclass
class DeviceModels:
    """What one device has loaded: the ASR, the VAD, the diarizer (None when off), and what they weigh."""

    asr: Any
    vad: Any
    diarizer: Any = None
    names: list[str] = field(default_factory=list)
    model_bytes: int = 0
    stream_bytes: int = 0


ModelLoader = Callable[[Device], DeviceModels]


class DeviceRuntime:
    def __init__(
        self,
        device: Device,
        loader: ModelLoader,
        idle_unload_seconds: float = 120.0,
        account: MemoryAccount | None = None,
        metrics: Metrics | None = None,
        max_batch: int = 32,
    ) -> None:
        self.device = device
        self.loader = loader
        self.idle_unload_seconds = idle_unload_seconds
        self.account = account
        self.metrics = metrics
        self.models: DeviceModels | None = None
        self.users = 0
        self.loads = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"device{device.id}")
        self._loading: asyncio.Future | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self.scheduler = DeviceScheduler(self, max_batch)
        self.on_loaded: Callable[[DeviceModels], None] | None = None  # e.g. derive the auto connection limit

    # -- inference ------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on this device's worker thread (scheduler rounds, loading, freeing)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- lifecycle ------------------------------------------------------
    async def acquire(self) -> DeviceModels:
        """The device's models, loading them if needed; counts the caller as a user.

        Raises GpuOutOfMemory or ModelLoadFailed (and then the caller is not a user).
        """
        self.users += 1
        self._cancel_idle_timer()
        try:
            if self.models is None:
                if self._loading is None:
                    self._loading = asyncio.ensure_future(self._load())
                await asyncio.shield(self._loading)
            assert self.models is not None
            return self.models
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """One user fewer; the last one starts the idle-unload timer."""
        self.users = max(0, self.users - 1)
        if self.users == 0 and self.models is not None and self.idle_unload_seconds > 0:
            loop = asyncio.get_running_loop()
            self._cancel_idle_timer()
            self._idle_handle = loop.call_later(self.idle_unload_seconds, self._unload_if_idle)

    async def load_now(self) -> DeviceModels:
        """Load without becoming a user (admin endpoint); the idle timer still applies."""
        models = await self.acquire()
        self.release()
        return models

    async def unload(self) -> bool:
        """Drop the models if no connection uses them; True if they were unloaded."""
        if self.users or self.models is None:
            return False
        self._cancel_idle_timer()
        self.models = None
        await self.run(_free_cached_memory, self.device)
        if self.account:
            self.account.set_model_bytes(self.device.id, 0)
        if self.metrics:
            self.metrics.model_unloaded(self.device.id)
        log.info("Unloaded models on GPU %d", self.device.id)
        return True

    def shutdown(self) -> None:
        self._cancel_idle_timer()
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def model_names(self) -> list[str]:
        return list(self.models.names) if self.models else []

    # -- internals ------------------------------------------------------
    async def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            models = await self.run(self.loader, self.device)
        except Exception as exc:
            log.error("Loading models on GPU %d failed: %s", self.device.id, exc)
            if is_out_of_memory(exc):
                raise GpuOutOfMemory(self.device.id, str(exc)[:80]) from exc
            raise ModelLoadFailed(self.device.id, str(exc)[:80]) from exc
        finally:
            self._loading = None
        self.models = models
        self.loads += 1
        if self.on_loaded is not None:
            self.on_loaded(models)
        seconds = time.perf_counter() - t0
        if self.account:
            self.account.set_model_bytes(self.device.id, models.model_bytes)
        if self.metrics:
            self.metrics.model_loaded(self.device.id, seconds)
        log.info("Loaded %s on GPU %d in %.1f s", ", ".join(models.names), self.device.id, seconds)

    def _unload_if_idle(self) -> None:
        self._idle_handle = None
        if self.users == 0 and self.models is not None:
            asyncio.ensure_future(self.unload())

    def _cancel_idle_timer(self) -> None:
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None


def _free_cached_memory(device: Device) -> None:
    """Give the memory of dropped models back: collect, and return CUDA's cached blocks to the driver."""
    gc.collect()
    if device.torch_device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
