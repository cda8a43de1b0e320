"""`--diarization --sortformer-model FILE.nemo` through the whole server: the streaming Sortformer
path loads a `.nemo` checkpoint and labels a live stream. The checkpoint is the tiny random-weight
Sortformer (no real weights can be downloaded here), so speakers are arbitrary; what is checked is
that the real streaming code runs per connection and its labels reach the captions."""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("nemo.collections.asr")

from backends.sortformer import build_tiny_sortformer  # noqa: E402
from streamserver.app import create_app  # noqa: E402
from streamserver.config import ServerConfig  # noqa: E402
from tests.live import drain_until_closed, open_asr, recv_json, serve_app  # noqa: E402
from tests.voices import make_conversation, to_pcm16  # noqa: E402

pytestmark = pytest.mark.slow


def test_sortformer_checkpoint_diarizes_a_live_stream(tmp_path):
    checkpoint = tmp_path / "tiny_sortformer.nemo"
    build_tiny_sortformer("cpu").save_to(str(checkpoint))
    audio, _ = make_conversation(tmp_path)
    config = ServerConfig(cache_dir=str(tmp_path / "cache"), diarization=True, sortformer_model=str(checkpoint))
    with serve_app(create_app(config)) as base:
        ws = open_asr(base, "format=pcm")
        assert recv_json(ws, timeout=60)["diarization"] is True
        data = to_pcm16(audio)
        for i in range(0, len(data), 16000):
            ws.send(data[i:i + 16000])
        ws.send(b"")
        messages = drain_until_closed(ws, timeout=240)
        status = httpx.get(f"http://{base}/gpu-status").json()
    assert messages[-1] == {"type": "ready_to_stop"}
    final = messages[-2]
    speech = [ln for ln in final["lines"] if ln["speaker"] != -2]
    assert speech and all(ln["speaker"] >= 1 for ln in speech)
    assert "meeting" in " ".join(ln["text"] for ln in speech).lower()
    assert final["buffer_diarization"] == ""
    assert "diarization:sortformer" in status["gpus"][0]["models"]
