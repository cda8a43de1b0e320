"""`GET /` and its static files, without a browser (tests/test_browser.py drives the page itself)."""
from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

from starlette.testclient import TestClient

from streamserver.app import create_app
from streamserver.config import ServerConfig
from streamserver.page import STATIC_DIR
from tests.fakes import fake_loader

ROOT = Path(__file__).resolve().parent.parent


def client(**config) -> TestClient:
    return TestClient(create_app(ServerConfig(simulate_gpus="1x16", **config), loader=fake_loader))


def test_the_page_and_everything_it_loads_are_served_without_a_token():
    with client(api_token="s3cret") as c:
        page = c.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache"
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
        assert sorted(assets) == ["/static/app.js", "/static/captions.js", "/static/style.css"]
        # the worklet is loaded by the script, only with --pcm-input
        assert '"/static/pcm-worklet.js"' in c.get("/static/app.js").text
        # a viewer's page (any id: its socket checks the key) loads the same captions code
        viewer = c.get("/watch/some-stream?key=k")
        assert viewer.status_code == 200 and viewer.headers["cache-control"] == "no-cache"
        assert sorted(re.findall(r'(?:src|href)="(/static/[^"]+)"', viewer.text)) == [
            "/static/captions.js", "/static/style.css", "/static/watch.js"]
        types = {"/static/app.js": "javascript", "/static/style.css": "text/css",
                 "/static/pcm-worklet.js": "javascript", "/static/captions.js": "javascript",
                 "/static/watch.js": "javascript"}
        for path, kind in types.items():
            answer = c.get(path)
            assert answer.status_code == 200 and kind in answer.headers["content-type"], path
        assert c.get("/static/nothing.js").status_code == 404
        assert c.get("/static/../config.py").status_code == 404


def test_a_non_editable_install_ships_every_static_file():
    """pyproject's package-data globs cover each file of streamserver/static/."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["streamserver"]
    files = [p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert files
    assert [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []
