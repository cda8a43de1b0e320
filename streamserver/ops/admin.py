"""Admin endpoints: load or unload one device's models on an operator's request.

Loading ahead of the first connection spares that connection the load time;
unloading frees the memory at once instead of after `--idle-unload-seconds`.
Both answer with JSON (the device's `/gpu-status` entry, or `{"error": ...}`).
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from .auth import require_token
from ..errors import GpuOutOfMemory, ModelLoadFailed
from ..engine.runtime import DeviceRuntime
from ..server import Server


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _target(request: Request) -> tuple[Server, DeviceRuntime] | JSONResponse:
    """The server and the runtime of `?gpu=N`, or the 400/404 answer."""
    server: Server = request.app.state.server
    text = request.query_params.get("gpu", "")
    try:
        gpu = int(text)
    except ValueError:
        return _error(f"Give the device as ?gpu=N (got {text!r})", 400)
    if gpu not in server.runtimes:
        return _error(f"Unknown GPU {gpu} (devices: {', '.join(map(str, sorted(server.runtimes)))})", 404)
    return server, server.runtimes[gpu]


@require_token
async def load_models(request: Request) -> JSONResponse:
    target = _target(request)
    if isinstance(target, JSONResponse):
        return target
    server, runtime = target
    try:
        await runtime.load_now()
    except GpuOutOfMemory as exc:
        return _error(exc.message, 507)
    except ModelLoadFailed as exc:
        return _error(exc.message, 500)
    return JSONResponse(server.gpu_entry(runtime.device.id))


@require_token
async def unload_models(request: Request) -> JSONResponse:
    target = _target(request)
    if isinstance(target, JSONResponse):
        return target
    server, runtime = target
    if runtime.users:
        return _error(f"Models on GPU {runtime.device.id} are in use by {runtime.users} connection(s)", 409)
    await runtime.unload()  # nothing loaded is fine: the answer shows the device unloaded
    return JSONResponse(server.gpu_entry(runtime.device.id))
