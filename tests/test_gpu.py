"""On a CUDA machine a connection's models run on its GPU. Skipped where there is no CUDA."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.live import drain_until_closed, open_asr, recv_json, serve_app
from tests.random_whisper import save_random_whisper

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_models_are_pinned_to_cuda0(tmp_path):
    # Random weights of tiny.en's architecture: the GPU machine cannot fetch the real ones.
    model = save_random_whisper("tiny.en", tmp_path / "tiny-random.pt")
    app = create_app(ServerConfig(model=str(model), cache_dir=str(tmp_path), gpus=(0,), pcm_input=True))
    with serve_app(app) as base:
        ws = open_asr(base)
        cfg = recv_json(ws, timeout=60)
        assert cfg["device"] == "cuda:0" and cfg["gpu_id"] == 0
        t = np.arange(16000 * 2) / 16000
        ws.send((0.2 * np.sin(2 * np.pi * 200 * t) * 32767).astype("<i2").tobytes())
        ws.send(b"")
        messages = drain_until_closed(ws, timeout=120)
        assert messages[-1] == {"type": "ready_to_stop"}
        models = app.state.server.runtimes[0].models
        assert models is not None
        assert next(models.asr.model.parameters()).device == torch.device("cuda", 0)
        assert next(models.vad.net.parameters()).device == torch.device("cuda", 0)
