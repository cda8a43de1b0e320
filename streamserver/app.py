"""The Starlette application: routes and the server's lifespan."""
from __future__ import annotations

import contextlib
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from .config import ServerConfig
from .connection import asr_endpoint
from .runtime import ModelLoader
from .server import Server

log = logging.getLogger("streamserver")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def gpu_status(request: Request) -> JSONResponse:
    server: Server = request.app.state.server
    return JSONResponse(server.gpu_status())


def create_app(config: ServerConfig | None = None, loader: ModelLoader | None = None, nvml_factory=None) -> Starlette:
    """Build the app. Tests pass a `loader` (fake models) or an `nvml_factory` (fake GPUs)."""
    config = config or ServerConfig()
    kwargs = {"nvml_factory": nvml_factory} if nvml_factory is not None else {}
    server = Server.build(config, loader, **kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        server.shutdown()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/gpu-status", gpu_status),
            WebSocketRoute("/asr", asr_endpoint),
        ],
        lifespan=lifespan,
    )
    app.state.server = server
    return app
