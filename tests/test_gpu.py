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


def test_cuda_graph_decoding_matches_eager_decoding():
    """The replayed CUDA graph of the decoder step computes what the eager step computes."""

    from backends.asr_types import TranscribeJob
    from backends.batched_whisper import BatchedWhisper
    from tests.random_whisper import decoded_rows, random_model

    torch.manual_seed(0)
    model = random_model("tiny.en").to("cuda:0")
    rng = np.random.default_rng(0)
    jobs = [TranscribeJob((0.05 * rng.standard_normal(16000 * s)).astype(np.float32)) for s in (2, 5, 9)]

    def run(graphs: bool):
        """Each row's decoded tokens: what the two steps must agree on."""
        engine = BatchedWhisper(model, "en", fp16=False, cuda_graphs=graphs, max_batch=4)
        engine.force_tokens_per_second = 4.0
        engine.max_tokens_per_second = 4.0
        decoded = decoded_rows(engine)
        engine.transcribe_batch(jobs)
        return [list(row.tokens) for row in decoded]

    eager, graphed = run(False), run(True)
    assert graphed == eager
    assert len(eager) == len(jobs) and all(eager)


def test_warm_up_captures_every_graph_a_round_needs():
    """After a device's models load, no round captures a CUDA graph or grows the step's buffers:
    a capture on the live path holds up every stream of the device."""

    from backends.asr_types import TranscribeJob
    from backends.batched_whisper import BatchedWhisper
    from tests.random_whisper import random_model

    torch.manual_seed(0)
    engine = BatchedWhisper(random_model("tiny.en").to("cuda:0"), "en", max_batch=8)
    engine.force_tokens_per_second = 4.0
    engine.max_tokens_per_second = 4.0
    engine.warm_up()
    step, graphs = engine._step, dict(engine._step.graphs)
    assert step.buf.rows == 8 and {(n, s) for n, _, s in graphs} == {(n, s) for n in (1, 2, 4, 8) for s in (False, True)}
    rng = np.random.default_rng(0)
    for streams in (3, 8, 5):
        jobs = [TranscribeJob((0.05 * rng.standard_normal(16000 * 4)).astype(np.float32)) for _ in range(streams)]
        assert all(segs is not None for segs in engine.transcribe_batch(jobs))
    assert engine._step is step and step.graphs == graphs
