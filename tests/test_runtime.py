"""A device's model lifecycle: one lazy load however many connections arrive at once, idle unload,
and a failed load reaching every waiter."""
from __future__ import annotations

import asyncio
import threading

import pytest

from gpu_manager import MemoryAccount, discover
from streamserver.errors import GpuOutOfMemory, ModelLoadFailed
from streamserver.engine.runtime import DeviceRuntime
from tests.fakes import fake_loader

DEVICE = discover(simulate="1x16").devices[0]


class CountingLoader:
    def __init__(self, fail: Exception | None = None) -> None:
        self.calls = 0
        self.fail = fail
        self.gate = threading.Event()

    def __call__(self, device):
        self.calls += 1
        self.gate.wait(10)  # every connection has arrived before the load ends
        if self.fail:
            raise self.fail
        return fake_loader(device)


def test_concurrent_first_connections_share_one_load():
    async def main():
        loader = CountingLoader()
        runtime = DeviceRuntime(DEVICE, loader, idle_unload_seconds=0)
        waiters = [asyncio.ensure_future(runtime.acquire()) for _ in range(8)]
        await asyncio.sleep(0.05)
        loader.gate.set()
        models = await asyncio.gather(*waiters)
        runtime.shutdown()
        return loader.calls, models, runtime.users

    calls, models, users = asyncio.run(main())
    assert calls == 1 and all(m is models[0] for m in models) and users == 8


def test_idle_models_unload_and_their_memory_is_given_back():
    async def main():
        account = MemoryAccount()
        runtime = DeviceRuntime(DEVICE, fake_loader, idle_unload_seconds=0.05, account=account)
        await runtime.acquire()
        loaded = (runtime.models is not None, account.used(DEVICE.id))
        runtime.release()
        for _ in range(100):
            if runtime.models is None and account.used(DEVICE.id) == 0:
                break
            await asyncio.sleep(0.02)
        gone = (runtime.models is None, account.used(DEVICE.id))
        await runtime.acquire()  # a later connection loads again
        again = runtime.models is not None
        runtime.shutdown()
        return loaded, gone, again

    loaded, gone, again = asyncio.run(main())
    assert loaded == (True, 100 * 2**20) and gone == (True, 0) and again


@pytest.mark.parametrize("error, kind", [(RuntimeError("bad checkpoint"), ModelLoadFailed),
                                         (MemoryError("CUDA out of memory"), GpuOutOfMemory)])
def test_a_failed_load_reaches_every_waiter_and_the_next_connection_tries_again(error, kind):
    async def main():
        loader = CountingLoader(fail=error)
        runtime = DeviceRuntime(DEVICE, loader, idle_unload_seconds=0)
        waiters = [asyncio.ensure_future(runtime.acquire()) for _ in range(3)]
        await asyncio.sleep(0.05)
        loader.gate.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        users_after = runtime.users
        loader.fail = None
        await runtime.acquire()
        runtime.shutdown()
        return results, users_after, loader.calls

    results, users_after, calls = asyncio.run(main())
    assert all(isinstance(r, kind) and "GPU 0" in r.message for r in results)
    assert users_after == 0 and calls == 2
