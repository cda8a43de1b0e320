"""Files: the OpenAI-compatible endpoint and the /jobs API, with real tiny.en weights."""
from __future__ import annotations

import json
import re
import subprocess
import time

import httpx
import pytest

from bench.metrics import wer
from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.live import serve_app


@pytest.fixture(scope="module")
def server(tiny_en_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("jobs")
    app = create_app(ServerConfig(model=str(tiny_en_checkpoint), jobs_db=str(folder / "jobs.sqlite"),
                                  max_upload_mb=5))
    with serve_app(app) as base:
        yield f"http://{base}"


@pytest.fixture(scope="module")
def encoded(speech_wav, tmp_path_factory):
    """The test speech as WAV, MP3, webm/opus and FLAC (ffmpeg)."""
    folder = tmp_path_factory.mktemp("formats")
    files = {"wav": speech_wav}
    for ext, codec in (("mp3", ["-c:a", "libmp3lame"]), ("webm", ["-c:a", "libopus"]), ("flac", ["-c:a", "flac"])):
        out = folder / f"speech.{ext}"
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(speech_wav), *codec, str(out)], check=True)
        files[ext] = out
    return files


@pytest.mark.parametrize("ext", ["wav", "mp3", "webm", "flac"])
def test_every_format_comes_back_with_the_right_words(server, encoded, speech_text, ext):
    with open(encoded[ext], "rb") as f:
        r = httpx.post(f"{server}/v1/audio/transcriptions", files={"file": (f"speech.{ext}", f)},
                       data={"model": "whisper-1"}, timeout=120)
    assert r.status_code == 200, r.text
    assert wer(speech_text, r.json()["text"]) <= 0.15


def _stamps(text: str, mark: str) -> list[float]:
    out = []
    for h, m, s, ms in re.findall(rf"(\d\d):(\d\d):(\d\d){re.escape(mark)}(\d\d\d)", text):
        out.append(int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000)
    return out


def test_srt_vtt_and_verbose_json_carry_ordered_times(server, encoded):
    bodies = {}
    for fmt in ("srt", "vtt", "verbose_json"):
        with open(encoded["wav"], "rb") as f:
            r = httpx.post(f"{server}/v1/audio/transcriptions", files={"file": ("speech.wav", f)},
                           data={"response_format": fmt, "timestamp_granularities[]": "word"}, timeout=120)
        assert r.status_code == 200, r.text
        bodies[fmt] = r.text
    srt = _stamps(bodies["srt"], ",")
    assert bodies["srt"].startswith("1\n") and srt and srt == sorted(srt)
    vtt = _stamps(bodies["vtt"], ".")
    assert bodies["vtt"].startswith("WEBVTT") and vtt and vtt == sorted(vtt)
    verbose = json.loads(bodies["verbose_json"])
    words = verbose["words"]
    assert len(words) >= 15 and all(w["start"] <= w["end"] for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    assert verbose["segments"] and verbose["duration"] > 6


def test_the_openai_sdk_transcribes_against_the_server(server, speech_wav, speech_text):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    with open(speech_wav, "rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert wer(speech_text, result.text) <= 0.15


def test_a_job_runs_to_done_and_its_result_comes_in_every_format(server, encoded, speech_text):
    with open(encoded["flac"], "rb") as f:
        r = httpx.post(f"{server}/jobs", files={"file": ("speech.flac", f)}, timeout=60)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while (status := httpx.get(f"{server}/jobs/{job_id}").json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status["status"] == "done" and status["progress"] == 1.0 and status["audio_seconds"] > 6
    result = httpx.get(f"{server}/jobs/{job_id}/result").json()
    assert wer(speech_text, result["text"]) <= 0.15 and result["segments"]
    assert wer(speech_text, httpx.get(f"{server}/jobs/{job_id}/result?format=text").text) <= 0.15
    assert "speakers" not in result  # not diarized: no speaker turns, and no RTTM of them
    assert httpx.get(f"{server}/jobs/{job_id}/result?format=rttm").status_code == 400
    assert job_id in [j["id"] for j in httpx.get(f"{server}/jobs?status=done").json()["jobs"]]
    metrics = _samples(httpx.get(f"{server}/metrics").text)
    assert metrics['streamserver_jobs{status="done"}'] >= 1
    assert metrics['streamserver_file_audio_processed_seconds_total{gpu_id="0"}'] >= status["audio_seconds"]
    assert metrics['streamserver_file_device_seconds_total{gpu_id="0"}'] > 0
    assert "streamserver_file_throughput_ratio" in metrics
    assert 0.0 <= httpx.get(f"{server}/gpu-status").json()["gpus"][0]["batch_share"] <= 1.0
    assert httpx.delete(f"{server}/jobs/{job_id}").status_code == 204
    assert httpx.get(f"{server}/jobs/{job_id}").status_code == 404


def _samples(text: str) -> dict[str, float]:
    """Prometheus text exposition → {'name{labels}': value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_bad_files_sizes_and_ids_get_their_status_codes(server, tmp_path):
    r = httpx.post(f"{server}/v1/audio/transcriptions", files={"file": ("x.wav", b"not audio at all" * 64)})
    assert r.status_code == 400 and "not a decodable audio file" in r.json()["error"]
    assert str(tmp_path) not in r.text
    big = b"\0" * (6 * 2**20)
    assert httpx.post(f"{server}/jobs", files={"file": ("big.wav", big)}, timeout=60).status_code == 413
    assert httpx.get(f"{server}/jobs/nope").status_code == 404
    assert httpx.get(f"{server}/jobs/nope/result").status_code == 404
    assert httpx.delete(f"{server}/jobs/nope").status_code == 404
    assert httpx.post(f"{server}/jobs", data={"language": "en"}).status_code == 400


def test_the_transcribe_command_uploads_and_prints_the_transcript(server, encoded, speech_text):
    import sys

    out = subprocess.run([sys.executable, "-m", "streamserver", "transcribe", str(encoded["mp3"]), "--url", server,
                          "--format", "srt"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1\n") and wer(speech_text, " ".join(
        line for line in out.stdout.splitlines() if line and not line[0].isdigit())) <= 0.15
    assert "upload" in out.stderr and "transcribe" in out.stderr


def test_a_diarized_job_gives_each_turn_its_speaker(server, tmp_path):
    import wave

    from tests.voices import make_conversation, to_pcm16

    audio, truth = make_conversation(tmp_path)
    path = tmp_path / "conversation.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(to_pcm16(audio))
    with open(path, "rb") as f:
        job_id = httpx.post(f"{server}/jobs", files={"file": ("c.wav", f)}, data={"diarization": "true"},
                            timeout=60).json()["id"]
    deadline = time.monotonic() + 180
    while httpx.get(f"{server}/jobs/{job_id}").json()["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    result = httpx.get(f"{server}/jobs/{job_id}/result").json()
    segments = result["segments"]
    speakers = []
    for start, end, voice in truth:  # the speaker of the segments inside each true turn
        inside = [s["speaker"] for s in segments if start - 0.5 <= (s["start"] + s["end"]) / 2 <= end + 0.5]
        assert inside and len(set(inside)) == 1, (voice, segments)
        speakers.append(inside[0])
    assert speakers == [1, 2, 1, 2]
    # The speaker turns themselves, numbered as the words are: most of each true turn is its speaker's.
    turns = result["speakers"]
    for (start, end, _), number in zip(truth, speakers):
        mine = sum(max(0.0, min(end, t["end"]) - max(start, t["start"])) for t in turns if t["speaker"] == number)
        assert mine >= 0.5 * (end - start), (start, end, number, turns)
    rttm = httpx.get(f"{server}/jobs/{job_id}/result?format=rttm")
    assert rttm.status_code == 200
    rows = [line.split() for line in rttm.text.splitlines()]
    assert rows and all(r[0] == "SPEAKER" and r[1] == job_id and len(r) == 10 for r in rows)
    assert [(float(r[3]), r[7]) for r in rows] == [(t["start"], f"speaker{t['speaker']}") for t in turns
                                                   if t["end"] > t["start"]]


def test_a_long_job_finishes_after_a_sigkill_and_restart_from_its_last_finished_chunk(tiny_en_checkpoint, tmp_path):
    """The real model: a 2-minute file, the server killed with SIGKILL part way, restarted."""
    import signal

    from bench.file_jobs import long_file
    from tests.live import start_server_process

    path = long_file(tmp_path, 2.0)
    argv = ["-m", "streamserver", "--model", str(tiny_en_checkpoint), "--jobs-db", str(tmp_path / "j.sqlite")]
    proc, base = start_server_process(argv)
    try:
        with open(path, "rb") as f:
            job_id = httpx.post(f"http://{base}/jobs", files={"file": ("long.wav", f)}, timeout=60).json()["id"]
        deadline = time.monotonic() + 300
        while not 0 < (before := httpx.get(f"http://{base}/jobs/{job_id}").json()["progress"]) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc, base = start_server_process(argv)
    try:
        after_restart = httpx.get(f"http://{base}/jobs/{job_id}").json()["progress"]
        deadline = time.monotonic() + 300
        while (status := httpx.get(f"http://{base}/jobs/{job_id}").json())["status"] != "done":
            assert status["status"] != "failed" and time.monotonic() < deadline, status
            time.sleep(0.2)
        result = httpx.get(f"http://{base}/jobs/{job_id}/result").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert after_restart >= before  # the chunks done before the kill were kept
    assert abs(status["audio_seconds"] - 120) < 10
    assert wer((tmp_path / "long.txt").read_text(), result["text"]) <= 0.15
    starts = [w["start"] for w in result["words"]]
    assert starts == sorted(starts) and len(starts) == len(set(starts))  # no chunk's words twice
