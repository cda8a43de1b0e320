"""The Starlette application: routes and the server's lifespan."""
from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from .ops.admin import load_models, unload_models
from .ops import heap
from .ops.auth import require_token
from .config import ServerConfig
from .protocols.asr import asr_endpoint
from .protocols.asr_watch import watch_endpoint
from .protocols.deepgram import listen_endpoint
from .protocols.deepgram_prerecorded import prerecorded_endpoint
from .protocols.openai_realtime import realtime_endpoint
from .jobs.api import jobs_routes
from .page import page_routes
from .engine.runtime import ModelLoader
from .server import Server

log = logging.getLogger("streamserver")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """For load balancers: 503 while no stream would be admitted (every device full, or draining);
    either way with the free and total connection slots, so a balancer can weigh headroom."""
    server = request.app.state.server
    reason = server.readiness()
    free, total = server.slots()
    if reason is None:
        return JSONResponse({"ready": True, "free_slots": free, "total_slots": total})
    return JSONResponse({"ready": False, "reason": reason, "free_slots": free, "total_slots": total},
                        status_code=503)


@require_token
async def gpu_status(request: Request) -> JSONResponse:
    server: Server = request.app.state.server
    return JSONResponse(server.gpu_status())


@require_token
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.server.metrics.render()
    return Response(body, media_type=content_type)


def create_app(config: ServerConfig | None = None, loader: ModelLoader | None = None, nvml_factory=None) -> Starlette:
    """Build the app. Tests pass a `loader` (fake models) or an `nvml_factory` (fake GPUs)."""
    config = config or ServerConfig()
    kwargs = {"nvml_factory": nvml_factory} if nvml_factory is not None else {}
    server = Server.build(config, loader, **kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        server.jobs.start()
        trimmer = asyncio.create_task(heap.keep_trimmed())
        yield
        trimmer.cancel()
        await server.resumes.close_all()
        await server.jobs.stop()
        server.shutdown()

    app = Starlette(
        routes=[
            *page_routes(),
            Route("/health", health),
            Route("/ready", ready),
            Route("/gpu-status", gpu_status),
            Route("/metrics", metrics),
            Route("/models/load", load_models, methods=["POST"]),
            Route("/models/unload", unload_models, methods=["POST"]),
            WebSocketRoute("/asr", asr_endpoint),
            WebSocketRoute("/asr/watch/{stream_id}", watch_endpoint),
            WebSocketRoute("/v1/listen", listen_endpoint),
            Route("/v1/listen", prerecorded_endpoint, methods=["POST"]),
            WebSocketRoute("/v1/realtime", realtime_endpoint),
            *jobs_routes(),
        ],
        lifespan=lifespan,
    )
    app.state.server = server
    return app
