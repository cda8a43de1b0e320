"""Jobs survive a SIGKILL: queued and half-done jobs finish after a restart, each chunk's words once;
and file work yields to live streams."""
from __future__ import annotations

import asyncio
import os
import signal
import time
import wave
from contextlib import contextmanager

import httpx
import numpy as np

from backends.asr_types import TranscribeJob
from bench.file_jobs import long_file
from streamserver.app import create_app
from streamserver.config import ServerConfig
from streamserver.jobs.runner import CHUNK_SECONDS
from tests.fakes import EchoASR, fake_loader, runtime_with
from tests.live import open_asr, recv_json, serve_app, start_server_process


def _tone_wav(path, seconds: float) -> None:
    t = np.arange(int(seconds * 16000)) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_three_jobs_finish_after_a_sigkill_and_restart_with_nothing_done_twice(tmp_path):
    db = tmp_path / "jobs.sqlite"
    argv = ["-m", "tests.fake_server", "--simulate-gpus", "1x16", "--jobs-db", str(db)]
    seconds = [70.0, 45.0, 35.0]  # 5 to 10, 3 to 6 and 3 to 5 chunks of 7.5 to 15 s
    for i, s in enumerate(seconds):
        _tone_wav(tmp_path / f"f{i}.wav", s)
    slow = dict(os.environ, FAKE_ASR_SECONDS="0.7")  # each chunk takes 0.7 s
    proc, base = start_server_process(argv, env=slow)
    try:
        ids = []
        for i in range(3):
            with open(tmp_path / f"f{i}.wav", "rb") as f:
                r = httpx.post(f"http://{base}/jobs", files={"file": (f"f{i}.wav", f)}, timeout=30)
            assert r.status_code == 202
            ids.append(r.json()["id"])
        # kill -9 once the first job is part done
        _wait(lambda: 0 < httpx.get(f"http://{base}/jobs/{ids[0]}").json()["progress"] < 1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc, base = start_server_process(argv)
    try:
        _wait(lambda: all(httpx.get(f"http://{base}/jobs/{i}").json()["status"] == "done" for i in ids))
        for job_id, s in zip(ids, seconds):
            result = httpx.get(f"http://{base}/jobs/{job_id}/result").json()
            status = httpx.get(f"http://{base}/jobs/{job_id}").json()
            assert abs(status["audio_seconds"] - s) < 0.1
            words = result["words"] if "words" in result else [w for seg in result["segments"] for w in [seg]]
            # EchoASR says one word per whole second of each chunk; a chunk done twice would repeat them
            starts = [w["start"] for w in words]
            assert starts == sorted(starts) and len(starts) == len(set(starts))
            assert 0.88 * s <= len(words) <= s  # less each chunk's fraction of a second
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


class SlowASR(EchoASR):
    def __init__(self) -> None:
        self.file_calls = 0

    def transcribe_batch(self, jobs):
        time.sleep(0.2)  # every round keeps the device busy for 0.2 s
        if any(len(j.audio) > 20 * 16000 for j in jobs):
            self.file_calls += 1
        return super().transcribe_batch(jobs)


def _live_step():
    segments = yield TranscribeJob(np.zeros(16000, np.float32))
    return segments


def test_file_work_waits_while_live_streams_keep_the_device_busy_then_completes():
    asr = SlowASR()

    async def main():
        runtime = runtime_with(asr)
        await runtime.acquire()
        scheduler = runtime.scheduler
        live_rounds = 0

        async def live(seconds: float) -> None:
            nonlocal live_rounds
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                await scheduler.submit(_live_step())
                live_rounds += 1

        live_task = asyncio.ensure_future(live(3.0))
        await asyncio.sleep(0.5)  # live load established
        file_chunk = asyncio.ensure_future(scheduler.submit_batch(TranscribeJob(np.zeros(25 * 16000, np.float32))))
        await asyncio.sleep(2.0)
        during = (file_chunk.done(), asr.file_calls, scheduler.batch_paused())
        await live_task
        words = await asyncio.wait_for(file_chunk, 30)  # live stopped: the chunk runs
        runtime.shutdown()
        return during, words, live_rounds

    (done_during, calls_during, paused), words, live_rounds = asyncio.run(main())
    assert not done_during and calls_during == 0 and paused
    assert len([w for s in words for w in s.words]) == 25
    assert live_rounds >= 10


def test_sigterm_with_a_job_running_exits_and_the_job_resumes_on_restart(tmp_path):
    db = tmp_path / "jobs.sqlite"
    argv = ["-m", "tests.fake_server", "--simulate-gpus", "1x16", "--jobs-db", str(db), "--drain-seconds", "2"]
    _tone_wav(tmp_path / "f.wav", 70.0)
    proc, base = start_server_process(argv, env=dict(os.environ, FAKE_ASR_SECONDS="0.7"))
    with open(tmp_path / "f.wav", "rb") as f:
        job_id = httpx.post(f"http://{base}/jobs", files={"file": ("f.wav", f)}, timeout=30).json()["id"]
    _wait(lambda: httpx.get(f"http://{base}/jobs/{job_id}").json()["status"] in ("running", "paused"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    proc, base = start_server_process(argv)
    try:
        _wait(lambda: httpx.get(f"http://{base}/jobs/{job_id}").json()["status"] == "done")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_file_work_already_running_yields_once_live_streams_fill_the_device():
    """File chunks slipped between live rounds must not hide how busy the live streams keep the device."""
    asr = SlowASR()

    async def main():
        runtime = runtime_with(asr)
        await runtime.acquire()
        scheduler = runtime.scheduler
        chunks = [asyncio.ensure_future(scheduler.submit_batch(TranscribeJob(np.zeros(25 * 16000, np.float32))))
                  for _ in range(40)]
        await asyncio.sleep(0.5)  # file work is running
        started_with = asr.file_calls
        stop = time.monotonic() + 3.0

        async def live_stream():
            while time.monotonic() < stop:
                await scheduler.submit(_live_step())

        live = [asyncio.ensure_future(live_stream()) for _ in range(4)]
        await asyncio.sleep(1.0)  # live load established
        settled = asr.file_calls
        await asyncio.gather(*live)
        during = asr.file_calls - settled
        await asyncio.wait_for(asyncio.gather(*chunks), 60)
        runtime.shutdown()
        return started_with, during, asr.file_calls

    started_with, during, total = asyncio.run(main())
    assert started_with >= 1  # files ran while the device was free
    assert during <= 1  # at most one more round once live rounds ran back to back for 2 s
    assert total >= 1 and total <= 40


class _Reporting(EchoASR):
    """EchoASR on one device that reports each batch (`on_batch(device_id, jobs)`) and takes
    `seconds` per call."""

    def __init__(self, device_id: int, on_batch, seconds: float) -> None:
        self.device_id, self.on_batch, self.seconds = device_id, on_batch, seconds

    def transcribe_batch(self, jobs):
        self.on_batch(self.device_id, jobs)
        time.sleep(self.seconds)
        return super().transcribe_batch(jobs)


@contextmanager
def _jobs_server(tmp_path, on_batch, seconds: float = 0.0, db: str = "j.sqlite", **config):
    """A served app on fake models whose ASR is `_Reporting`; yields its http:// base."""
    def loader(device):
        models = fake_loader(device)
        models.asr = _Reporting(device.id, on_batch, seconds)
        return models

    settings = {"simulate_gpus": "1x16", "pcm_input": True, **config}
    with serve_app(create_app(ServerConfig(jobs_db=str(tmp_path / db), **settings), loader)) as base:
        yield f"http://{base}"


def _submit(base: str, path) -> str:
    with open(path, "rb") as f:
        return httpx.post(f"{base}/jobs", files={"file": ("f.wav", f)}, timeout=30).json()["id"]


def _status(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/jobs/{job_id}").json()


def _wait_status(base: str, job_id: str, status: str) -> None:
    _wait(lambda: _status(base, job_id)["status"] == status)


def test_a_file_is_cut_at_its_pauses_into_chunks_of_at_most_15_s(tmp_path):
    seen: list[int] = []
    path = long_file(tmp_path, 1.0)  # espeak sentences, 0.5 s of silence after each
    with wave.open(str(path)) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
    with _jobs_server(tmp_path, lambda _, jobs: seen.extend(len(j.audio) for j in jobs)) as base:
        _wait_status(base, _submit(base, path), "done")
    assert sum(seen) == len(audio) and max(seen) <= CHUNK_SECONDS * 16000 and len(seen) >= 4
    for cut in np.cumsum(seen)[:-1]:  # every cut falls in a pause
        around = audio[max(0, cut - 1600):cut + 1600]
        assert np.abs(around).max() < 0.01, cut / 16000


def test_file_chunks_batch_where_rounds_are_short_and_go_one_at_a_time_where_they_are_long(tmp_path):
    """A device with room (short file rounds) takes several chunks per round; a slow one stays at one,
    so a live stream arriving never waits behind a long batch of file work."""

    def batches_for(seconds_per_call: float, file_seconds: float) -> list[int]:
        sizes: list[int] = []
        _tone_wav(tmp_path / "f.wav", file_seconds)
        with _jobs_server(tmp_path, lambda _, jobs: sizes.append(len(jobs)), seconds_per_call,
                          db=f"j{seconds_per_call}.sqlite") as base:
            job_id = _submit(base, tmp_path / "f.wav")
            _wait_status(base, job_id, "done")
            words = httpx.get(f"{base}/jobs/{job_id}/result").json()["words"]
        # EchoASR: a word per whole second of each chunk, so each chunk's fraction of a second is lost
        assert len(words) == len({w["start"] for w in words}) and 0.9 * file_seconds <= len(words) <= file_seconds
        return sizes

    fast = batches_for(0.01, 600.0)  # 40 to 80 chunks of 7.5 to 15 s
    assert sum(fast) >= 20 and max(fast) >= 4
    slow = batches_for(1.5, 45.0)  # each round longer than the 1-s target: no growth
    assert len(slow) >= 3 and set(slow) == {1}


def test_every_device_works_on_one_long_file_at_once(tmp_path):
    by_device: dict[int, int] = {}

    def count(device_id, jobs):
        by_device[device_id] = by_device.get(device_id, 0) + len(jobs)

    _tone_wav(tmp_path / "f.wav", 300.0)
    with _jobs_server(tmp_path, count, 0.2, simulate_gpus="2x16") as base:
        job_id = _submit(base, tmp_path / "f.wav")
        _wait_status(base, job_id, "done")
        words = httpx.get(f"{base}/jobs/{job_id}/result").json()["words"]
    assert sorted(by_device) == [0, 1] and min(by_device.values()) >= 2, by_device
    starts = [w["start"] for w in words]
    assert starts == sorted(starts) and len(starts) == len(set(starts)) and len(starts) >= 270


def test_a_device_full_of_live_connections_runs_no_file_work_until_one_leaves(tmp_path):
    file_calls: list[int] = []

    def count(_, jobs):
        file_calls.extend(len(j.audio) for j in jobs if len(j.audio) > 16000 * 5)

    _tone_wav(tmp_path / "f.wav", 40.0)
    with _jobs_server(tmp_path, count, max_connections_per_gpu=2) as base:
        streams = [open_asr(base.removeprefix("http://")) for _ in range(2)]  # both slots, quiet streams
        for ws in streams:
            recv_json(ws)
        job_id = _submit(base, tmp_path / "f.wav")
        _wait_status(base, job_id, "paused")
        time.sleep(1.5)
        held = (_status(base, job_id), list(file_calls))
        streams[0].close()  # a slot is free again: the file runs beside the other stream
        _wait_status(base, job_id, "done")
        streams[1].close()
    status, calls = held
    assert status["status"] == "paused" and status["progress"] == 0 and calls == []
    assert file_calls


def test_a_device_that_fills_with_live_streams_leaves_the_rest_of_the_file_to_a_free_one(tmp_path):
    calls: list[tuple[int, float]] = []  # (device, time) of each file call

    def note(device_id, jobs):
        if any(len(j.audio) > 16000 * 5 for j in jobs):
            calls.append((device_id, time.monotonic()))

    _tone_wav(tmp_path / "f.wav", 240.0)
    with _jobs_server(tmp_path, note, 0.3, simulate_gpus="2x16", max_connections_per_gpu=1) as base:
        job_id = _submit(base, tmp_path / "f.wav")
        _wait(lambda: {d for d, _ in calls} == {0, 1})  # both devices at work on the file
        ws = open_asr(base.removeprefix("http://"))  # fills one device
        busy = recv_json(ws)["gpu_id"]
        full_at = time.monotonic()
        _wait_status(base, job_id, "done")
        ws.close()
    after = [d for d, t in calls if t > full_at + 0.35]  # rounds begun after the device filled (plus one in flight)
    assert after and busy not in after


def test_file_work_not_yet_begun_can_be_withdrawn_from_a_held_back_device():
    asr = SlowASR()

    async def main():
        runtime = runtime_with(asr)
        await runtime.acquire()
        scheduler = runtime.scheduler
        scheduler.is_full = lambda: True  # full of live connections: file work waits
        held = TranscribeJob(np.zeros(25 * 16000, np.float32))
        waiting = asyncio.ensure_future(scheduler.submit_batch(held))
        await asyncio.sleep(0.3)
        first = scheduler.withdraw(held)
        await asyncio.gather(waiting, return_exceptions=True)
        scheduler.is_full = lambda: False
        again = TranscribeJob(np.zeros(25 * 16000, np.float32))
        running = asyncio.ensure_future(scheduler.submit_batch(again))
        while scheduler.batch_rounds == 0:  # once the pause has been over for RESUME_AFTER, its round begins
            await asyncio.sleep(0.01)
        late = scheduler.withdraw(again)
        words = await running
        runtime.shutdown()
        return first, waiting.cancelled(), late, words

    first, cancelled, late, words = asyncio.run(main())
    assert first and cancelled and asr.file_calls == 1  # only the second chunk ever ran
    assert not late and len([w for s in words for w in s.words]) == 25


def test_jobs_live_in_the_users_data_folder_and_a_server_without_jobs_writes_nothing(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    started_in, data = tmp_path / "some-project", tmp_path / "data"
    started_in.mkdir()
    env = dict(os.environ, XDG_DATA_HOME=str(data), PYTHONPATH=str(root))
    argv = ["-m", "tests.fake_server", "--simulate-gpus", "1x16"]
    proc, base = start_server_process(argv, env=env, cwd=started_in)
    try:
        assert httpx.get(f"http://{base}/ready").status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    assert not data.exists() and list(started_in.iterdir()) == []  # no job, no file anywhere

    _tone_wav(tmp_path / "one.wav", 2.0)
    proc, base = start_server_process(argv, env=env, cwd=started_in)
    try:
        with open(tmp_path / "one.wav", "rb") as f:
            r = httpx.post(f"http://{base}/v1/audio/transcriptions", files={"file": ("one.wav", f)}, timeout=60)
        assert r.status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
    assert list(started_in.iterdir()) == []  # nothing left where the server was started
    assert (data / "streamserver" / "jobs.sqlite").exists()
