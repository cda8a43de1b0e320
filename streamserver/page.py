"""The live-caption page `GET /`, a viewer's page `GET /watch/<id>`, and their static files (package data).

Plain HTML, CSS and JavaScript under `streamserver/static/` (no build step). The
page needs no token to load; the socket it opens does (`?token=`).
"""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

# Revalidate on every load, so a page served after an upgrade never runs last version's script.
_NO_CACHE = {"Cache-Control": "no-cache"}


class _StaticFiles(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(_NO_CACHE)
        return response


async def index(request: Request) -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_NO_CACHE)


async def watch(request: Request) -> FileResponse:
    """A viewer's page (`/watch/<id>?key=KEY`): its socket checks the key and says when it is wrong."""
    return FileResponse(STATIC_DIR / "watch.html", media_type="text/html; charset=utf-8", headers=_NO_CACHE)


def page_routes() -> list:
    return [
        Route("/", index),
        Route("/watch/{stream_id}", watch),
        Mount("/static", app=_StaticFiles(directory=STATIC_DIR), name="static"),
    ]
