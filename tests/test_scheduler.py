"""The per-device scheduler: rounds that batch every waiting stream, isolate failures, and stay fair."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import torch

from backends.asr_types import TranscribeJob
from streamserver.app import create_app
from streamserver.config import ServerConfig
from streamserver.server import auto_limit
from tests.fakes import EchoASR, fake_loader, runtime_with, tone
from tests.live import drain_until_closed, open_asr, recv_json, serve_app

class RecordingASR(EchoASR):
    """Records each batch it is given; optionally runs out of memory above `fits` streams."""

    def __init__(self, fits: int | None = None, seconds: float = 0.0) -> None:
        self.batches: list[int] = []
        self.fits = fits
        self.seconds = seconds

    def transcribe_batch(self, jobs):
        self.batches.append(len(jobs))
        if self.seconds:
            time.sleep(self.seconds)  # a busy device: rounds take this long whatever their size
        if self.fits is not None and len(jobs) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().transcribe_batch(jobs)


def _steps(seconds: float, fail: bool = False):
    segments = yield TranscribeJob(np.zeros(int(seconds * 16000), np.float32))
    if fail:
        raise ValueError("this session broke")
    return [w.text for s in segments for w in s.words]


def _serve(runtime, generators):
    async def main():
        await runtime.acquire()
        results = await asyncio.gather(*(runtime.scheduler.submit(g) for g in generators), return_exceptions=True)
        runtime.shutdown()
        return results

    return asyncio.run(main())


def test_streams_waiting_together_are_answered_in_one_batch():
    asr = RecordingASR()
    results = _serve(runtime_with(asr), [_steps(s) for s in (1, 2, 3, 4, 5, 6)])
    assert asr.batches == [6]
    assert results == [[f" w{i}" for i in range(n)] for n in (1, 2, 3, 4, 5, 6)]


def test_one_sessions_failure_is_its_own():
    results = _serve(runtime_with(RecordingASR()), [_steps(2), _steps(2, fail=True), _steps(3)])
    assert results[0] == [" w0", " w1"] and results[2] == [" w0", " w1", " w2"]
    assert isinstance(results[1], ValueError)


def test_out_of_memory_halves_the_batch_until_it_fits():
    asr = RecordingASR(fits=2)
    results = _serve(runtime_with(asr), [_steps(1) for _ in range(8)])
    assert results == [[" w0"]] * 8
    assert asr.batches[0] == 8 and max(asr.batches[1:]) <= 4 and sum(b for b in asr.batches if b <= 2) == 8


def test_a_stream_that_cannot_run_even_alone_gets_the_error_and_others_their_answers():
    class PickyASR(EchoASR):
        def transcribe_batch(self, jobs):
            if any(len(j.audio) > 3 * 16000 for j in jobs):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return super().transcribe_batch(jobs)

    results = _serve(runtime_with(PickyASR()), [_steps(1), _steps(5), _steps(2)])
    assert results[0] == [" w0"] and results[2] == [" w0", " w1"]
    assert isinstance(results[1], torch.cuda.OutOfMemoryError)


def _realtime_tone_streams(asr, count: int, seconds: float, stagger: float = 0.0,
                           **config) -> dict[int, tuple[int, str]]:
    """`count` streams of a tone (`seconds`, 100-ms frames at real-time pace, stream k starting
    `stagger * k` s late) through a server whose device answers with `asr`: each one's number of
    caption updates and final text."""

    def loader(device):
        models = fake_loader(device)
        models.asr = asr
        return models

    app = create_app(ServerConfig(simulate_gpus="1x16", pcm_input=True, **config), loader)
    results: dict[int, tuple[int, str]] = {}

    def stream(k: int) -> None:
        time.sleep(stagger * k)
        ws = open_asr(base)
        recv_json(ws)
        audio = tone(seconds)
        for off in range(0, len(audio), 3200):
            ws.send(audio[off:off + 3200])
            time.sleep(0.1)
        ws.send(b"")
        updates = [m for m in drain_until_closed(ws, timeout=60) if "lines" in m]
        results[k] = (len(updates), " ".join(line["text"] for line in updates[-1]["lines"]))

    with serve_app(app) as base:
        threads = [threading.Thread(target=stream, args=(k,)) for k in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    return results


def test_with_many_streams_on_a_busy_device_every_stream_keeps_up_alike():
    """Eight live streams on a device whose every round takes 0.3 s: they share rounds (batches
    above one), get their words, and none is served much less often than the others."""
    asr = RecordingASR(seconds=0.3)
    results = _realtime_tone_streams(asr, 8, 4.0, max_connections_per_gpu=8)
    assert len(results) == 8
    assert {text for _, text in results.values()} == {"w0 w1 w2 w3"}
    counts = [n for n, _ in results.values()]
    assert min(counts) * 2 >= max(counts), counts
    assert max(asr.batches) > 1


def test_streams_that_start_out_of_step_fall_into_step_and_share_their_decodes():
    """Two real-time streams half a second apart on a device whose rounds take 0.2 s: their decodes
    come into the same rounds (batches of two) instead of taking turns, and each still hears every
    second of its audio."""
    asr = RecordingASR(seconds=0.2)
    results = _realtime_tone_streams(asr, 2, 8.0, stagger=0.5)
    assert {k: text for k, (_, text) in results.items()} == {k: " ".join(f"w{i}" for i in range(8)) for k in (0, 1)}
    assert asr.batches.count(2) >= len(asr.batches) // 2, asr.batches


def test_auto_limit_fits_streams_in_the_memory_budget():
    gib = 2**30
    assert auto_limit(80 * gib, 2 * gib, 64 * 2**20, 0.9) == int((72 - 2) * 1024 / 64)
    assert auto_limit(16 * gib, 15 * gib, 2**30, 0.9) == 1  # never below one


def test_auto_limit_is_set_from_the_measured_stream_memory_once_models_load():
    app = create_app(ServerConfig(simulate_gpus="1x16", max_connections_per_gpu="auto", pcm_input=True),
                     fake_loader)
    server = app.state.server
    assert server.allocator.limit(0) == 4  # until the device has measured a stream
    with serve_app(app) as base:
        ws = open_asr(base)
        recv_json(ws)
        ws.send(tone(1.0))
        ws.send(b"")
        drain_until_closed(ws)
    # fake_loader: 100 MB of weights, 1 MB per stream, 16 GB simulated at 90 %
    assert server.allocator.limit(0) == int((16 * 2**30 * 0.9 - 100 * 2**20) // 2**20)
    assert server.gpu_status()["max_connections_per_gpu"] == "auto"


def test_streams_diarized_in_one_round_go_to_the_diarizer_together():
    from backends.diarization_types import DiarizeJob
    from tests.fakes import LevelDiarizer

    diarizer = LevelDiarizer()
    runtime = runtime_with(RecordingASR())

    def steps():
        state = diarizer.new_state()
        turns = yield DiarizeJob(state, np.full(16000, 0.5, np.float32), np.ones(31, np.float32))
        return [t.speaker for t in turns]

    async def main():
        models = await runtime.acquire()
        models.diarizer = diarizer
        results = await asyncio.gather(*(runtime.scheduler.submit(steps()) for _ in range(3)))
        runtime.shutdown()
        return results

    assert asyncio.run(main()) == [[0] * 10] * 3
    assert diarizer.batches == [3]
