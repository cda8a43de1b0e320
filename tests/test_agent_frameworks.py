"""The voice-agent frameworks people reach the vendor protocols through, unchanged: Pipecat's and LiveKit
Agents' own Deepgram and OpenAI plugins, on real speech, against one server with the real tiny.en weights.

Each plugin is used as its documentation shows, with only its base URL and key pointed at the server, and
fed what the framework would feed it, without a room or a transport: LiveKit's STT streams get
`rtc.AudioFrame`s by `push_frame`, Pipecat's services sit in a pipeline behind a `VADProcessor` (the local
VAD every Pipecat voice agent has in front of its STT) and get `InputAudioRawFrame`s. The ten-sentence
telephone recording (a pause after each sentence) is streamed to all of them at once, at real-time pace
in 20-ms frames, then 3 s of open-microphone silence:

- Pipecat `OpenAIRealtimeSTTService` at its defaults (no server VAD: it commits at its VAD's stop),
- Pipecat `DeepgramSTTService` at its defaults (`Finalize` at its VAD's stop),
- LiveKit `deepgram.STT().stream()` at its defaults (`speech_final` / `UtteranceEnd` end the turn),
- LiveKit `openai.STT(use_realtime=True, model="gpt-realtime-whisper")` with its own Silero VAD
  committing, and with `vad=None` (the server's VAD alone makes the items),
- LiveKit `deepgram.STT().recognize()` on the whole recording (Deepgram's pre-recorded `POST /v1/listen`).

Each must see no error (no error event, no 1011, no retry), the server (a process of its own, so that
the plugins' Python does not slow it) must log no error or traceback, every turn's closing event must
carry all of its words (what each plugin's events make checkable: see `_late_*`), and the words must be
as right as openai-whisper's offline `transcribe` on the same weights, within the 5 points `/asr` is held
to. The plugins wait, as an open microphone, until the server has answered all it was sent (a bound:
`CATCH_UP_SECONDS`), so a busy machine slows the test down rather than failing it.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.live import start_server_process
from tests.real_speech import offline_pooled_wer, pooled, real_clips

pytestmark = pytest.mark.slow

CLIP = "telephone_osr_us_000_0034_8k"
BOUND = 0.05
RATE = 16000
FRAME = RATE // 50  # 20 ms
TAIL_SECONDS = 3.0
CATCH_UP_SECONDS = 30.0  # how long after the tail a busy server may take to answer all it was sent
GRACE_SECONDS = 1.5  # after the last words: anything late would come now
KEY = "secret"


@dataclass
class Run:
    """What one plugin showed its framework: (seconds since the first frame, kind, text, extra)."""

    name: str = ""
    events: list[tuple[float, str, str, dict]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    t0: float = 0.0

    def add(self, kind: str, text: str = "", **extra) -> None:
        self.events.append((time.monotonic() - self.t0, kind, text, extra))

    def kinds(self) -> list[str]:
        return [k for _, k, _, _ in self.events]

    def finals(self) -> list[str]:
        return [text for _, kind, text, _ in self.events if kind == "final" and text]

    def text(self) -> str:
        return " ".join(self.finals())


# ---------------------------------------------------------------- LiveKit Agents


async def _livekit_stream(stt, run: Run, frames: asyncio.Queue) -> None:
    """Feeds the plugin's STT stream and records its speech events until the stream ends."""
    from livekit import rtc
    from livekit.agents import stt as agents_stt

    stt.on("error", lambda e: run.errors.append(f"stt error event: {e.error!r} recoverable={e.recoverable}"))
    stream = stt.stream()

    async def feed() -> None:
        while (chunk := await frames.get()) is not None:
            stream.push_frame(rtc.AudioFrame(chunk, RATE, 1, len(chunk) // 2))
        stream.end_input()

    async def read() -> None:
        kinds = {agents_stt.SpeechEventType.START_OF_SPEECH: "start", agents_stt.SpeechEventType.END_OF_SPEECH: "end",
                 agents_stt.SpeechEventType.INTERIM_TRANSCRIPT: "interim",
                 agents_stt.SpeechEventType.FINAL_TRANSCRIPT: "final"}
        async for ev in stream:
            if ev.type not in kinds:
                continue
            alt = ev.alternatives[0] if ev.alternatives else None
            run.add(kinds[ev.type], alt.text if alt else "", request_id=ev.request_id,
                    start=alt.start_time if alt else None, end=alt.end_time if alt else None)

    reader = asyncio.create_task(read())
    try:
        await feed()
        # the Deepgram stream ends when the server closes after CloseStream; the OpenAI one keeps its pooled
        # socket open, so it is given as long as a late event could take, then closed
        done, _ = await asyncio.wait([reader], timeout=10.0)
        if reader in done:
            reader.result()
    except Exception as exc:  # the stream gave up: what an agent would see
        run.errors.append(f"stream raised {type(exc).__name__}: {exc}")
    finally:
        reader.cancel()
        await stream.aclose()
        await stt.aclose()


async def livekit_deepgram(base: str, run: Run, frames: asyncio.Queue) -> None:
    import aiohttp
    from livekit.plugins import deepgram

    async with aiohttp.ClientSession() as http:
        stt = deepgram.STT(api_key=KEY, base_url=f"http://{base}/v1/listen", http_session=http, sample_rate=RATE)
        await _livekit_stream(stt, run, frames)


async def livekit_deepgram_recognize(base: str, run: Run, pcm: np.ndarray) -> None:
    import aiohttp
    from livekit import rtc
    from livekit.plugins import deepgram

    async with aiohttp.ClientSession() as http:
        stt = deepgram.STT(api_key=KEY, base_url=f"http://{base}/v1/listen", http_session=http, sample_rate=RATE)
        stt.on("error", lambda e: run.errors.append(f"stt error event: {e.error!r}"))
        try:
            ev = await stt.recognize(rtc.AudioFrame(pcm.tobytes(), RATE, 1, len(pcm)))
            run.add("final", ev.alternatives[0].text if ev.alternatives else "", type=ev.type.name)
        except Exception as exc:
            run.errors.append(f"recognize raised {type(exc).__name__}: {exc}")
        await stt.aclose()


async def livekit_openai(base: str, run: Run, frames: asyncio.Queue, server_vad: bool) -> None:
    from livekit.agents.utils import http_context
    from livekit.plugins import openai

    async with http_context.open():
        stt = openai.STT(use_realtime=True, model="gpt-realtime-whisper", base_url=f"http://{base}/v1", api_key=KEY,
                         **({"vad": None} if server_vad else {}))
        await _livekit_stream(stt, run, frames)


# ---------------------------------------------------------------- Pipecat


async def pipecat(base: str, run: Run, frames: asyncio.Queue, service: str) -> None:
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.frames.frames import (EndFrame, ErrorFrame, InputAudioRawFrame, InterimTranscriptionFrame,
                                       TranscriptionFrame, VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.audio.vad_processor import VADProcessor
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.workers.runner import WorkerRunner

    class Tap(FrameProcessor):
        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if isinstance(frame, ErrorFrame):
                run.errors.append(f"ErrorFrame {frame.error!r}")
            elif isinstance(frame, TranscriptionFrame):
                words = frame.result.channel.alternatives[0].words if service == "deepgram" else []
                run.add("final", frame.text, result=frame.result, start=words[0].start if words else None,
                        end=words[-1].end if words else None,
                        closes=bool(getattr(frame.result, "from_finalize", False)),
                        speech_final=bool(getattr(frame.result, "speech_final", False)))
            elif isinstance(frame, InterimTranscriptionFrame):
                run.add("interim", frame.text, result=frame.result)
            elif isinstance(frame, VADUserStartedSpeakingFrame) and self is downstream:
                run.add("start")
            elif isinstance(frame, VADUserStoppedSpeakingFrame) and self is downstream:
                run.add("end")
            await self.push_frame(frame, direction)

    if service == "openai":
        from pipecat.services.openai.stt import OpenAIRealtimeSTTService

        stt = OpenAIRealtimeSTTService(api_key=KEY, base_url=f"ws://{base}/v1/realtime")
    else:
        from pipecat.services.deepgram.stt import DeepgramSTTService

        stt = DeepgramSTTService(api_key=KEY, base_url=f"http://{base}")
    upstream, downstream = Tap(), Tap()  # errors travel upstream, transcripts and VAD frames downstream
    pipeline = Pipeline([upstream, VADProcessor(vad_analyzer=SileroVADAnalyzer()), stt, downstream])
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=RATE), idle_timeout_secs=None)

    async def feed() -> None:
        while (chunk := await frames.get()) is not None:
            await worker.queue_frame(InputAudioRawFrame(audio=chunk, sample_rate=RATE, num_channels=1))
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), feed())


# ---------------------------------------------------------------- all at once

CLIENTS = ["pipecat-openai-realtime", "pipecat-deepgram", "livekit-deepgram", "livekit-deepgram-recognize",
           "livekit-openai-commits", "livekit-openai-server-vad"]


def _words(text: str) -> int:
    return len(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


async def _all(base: str, pcm: np.ndarray, reference: str) -> dict[str, Run]:
    runs = {name: Run(name) for name in CLIENTS}
    queues = {name: asyncio.Queue() for name in CLIENTS if name != "livekit-deepgram-recognize"}
    tasks = [
        pipecat(base, runs["pipecat-openai-realtime"], queues["pipecat-openai-realtime"], "openai"),
        pipecat(base, runs["pipecat-deepgram"], queues["pipecat-deepgram"], "deepgram"),
        livekit_deepgram(base, runs["livekit-deepgram"], queues["livekit-deepgram"]),
        livekit_openai(base, runs["livekit-openai-commits"], queues["livekit-openai-commits"], server_vad=False),
        livekit_openai(base, runs["livekit-openai-server-vad"], queues["livekit-openai-server-vad"], server_vad=True),
    ]

    async def pace() -> None:
        await asyncio.sleep(1.0)  # each plugin opens its socket (Pipecat's at its StartFrame)
        audio = np.concatenate([pcm, np.zeros(int(TAIL_SECONDS * RATE), dtype=np.int16)])
        t0 = time.monotonic()
        for run in runs.values():
            run.t0 = t0
        silence = bytes(2 * FRAME)
        expected = _words(reference) - 3
        grace = None
        for k in itertools.count():
            i = k * FRAME
            if i + FRAME > len(audio):  # the open microphone goes on while the server catches up, until
                # every plugin holds about all the words (or a bound), and a little longer for late events
                done = all(_words(runs[n].text()) >= expected for n in queues)
                if grace is None and (done or time.monotonic() - t0 > len(audio) / RATE + CATCH_UP_SECONDS):
                    grace = time.monotonic() + GRACE_SECONDS
                if grace is not None and time.monotonic() > grace:
                    break
            chunk = audio[i:i + FRAME].tobytes() if i + FRAME <= len(audio) else silence
            for q in queues.values():
                q.put_nowait(chunk)
            await asyncio.sleep(max(0.0, t0 + (k + 1) * FRAME / RATE - time.monotonic()))
        for q in queues.values():
            q.put_nowait(None)

    await asyncio.gather(pace(), *tasks)
    # the pre-recorded request after the live streams: a 35-s file job would take the CPU from them
    await livekit_deepgram_recognize(base, runs["livekit-deepgram-recognize"], pcm)
    return runs


@pytest.fixture(scope="module")
def clip():
    return real_clips([CLIP])[0]


@pytest.fixture(scope="module")
def runs(clip, tiny_en_checkpoint, tmp_path_factory):
    pytest.importorskip("pipecat")
    pytest.importorskip("livekit.agents")
    pcm = np.frombuffer(clip.pcm16(), dtype="<i2")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as sink:
        proc, base = start_server_process(["-m", "streamserver", "--model", str(tiny_en_checkpoint), "--pcm-input",
                                           "--idle-unload-seconds", "0", "--api-token", KEY,
                                           "--max-connections-per-gpu", str(2 * len(CLIENTS)),
                                           "--jobs-db", str(log.parent / "jobs.sqlite"), "--log-level", "info"],
                                          stdout=sink, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            out = asyncio.run(_all(base, pcm, clip.reference))
        finally:
            proc.terminate()
            proc.wait(30)
    return out, log.read_text()


@pytest.fixture(scope="module")
def offline_wer(clip, tiny_en_checkpoint) -> float:
    return offline_pooled_wer([clip], tiny_en_checkpoint)


def _late_deepgram_words(run: Run) -> list[str]:
    """Deepgram, whose finals carry the stream times of their words: a turn is closed by LiveKit's
    END_OF_SPEECH (the server's `speech_final` / `UtteranceEnd`) or by the answer to Pipecat's `Finalize`
    (`from_finalize`), and a final after the close whose words were spoken before the closed turn's last
    word ended belongs to that turn (LiveKit opens a turn of its own for it; Pipecat's agent has answered
    the turn without it)."""
    late, closed_until, last_end = [], -1.0, -1.0
    for _, kind, text, extra in run.events:
        if kind == "final" and extra.get("start") is not None:
            # A word that began before the closed turn's last word ended is that turn's. (After it, a new
            # utterance may begin within tens of ms: LiveKit asks for 25-ms endpointing.)
            if extra["start"] < closed_until:
                late.append(text)
            last_end = max(last_end, extra["end"])
        if (kind == "end" and run.name == "livekit-deepgram") or extra.get("closes") or extra.get("speech_final"):
            closed_until = last_end
    return late


def _late_after_close(run: Run) -> list[str]:
    """Where the client's own VAD ends the turn (Pipecat's VADUserStoppedSpeakingFrame, LiveKit OpenAI's
    Silero) and the server is asked for it (Pipecat Deepgram's `Finalize`, the OpenAI `commit`s): each
    close is answered by at most one final, so a final beyond the closes so far holds words of a turn
    already answered (`request_id` / `item_id` tell the OpenAI items apart)."""
    late, closes, answered = [], 0, 0
    for _, kind, text, _ in run.events:
        if kind == "end":
            closes += 1
        elif kind == "final" and text:
            answered += 1
            if answered > closes:
                late.append(text)
    return late


@pytest.mark.parametrize("name", CLIENTS)
def test_each_plugin_transcribes_real_speech_with_every_turn_closed_with_all_its_words(name, runs, clip,
                                                                                        offline_wer):
    out, _ = runs
    run = out[name]
    assert not run.errors, (name, run.errors)
    text = run.text()
    assert pooled([clip], {clip.name: text}) <= offline_wer + BOUND, (name, text, offline_wer)
    if name == "livekit-deepgram-recognize":
        return
    shown = [e[:3] for e in run.events if e[1] != "interim"]
    if "deepgram" in name:
        assert not _late_deepgram_words(run), (_late_deepgram_words(run), shown)
    else:
        assert not _late_after_close(run), (_late_after_close(run), shown)
        ids = [e[3].get("request_id") or e[3]["result"]["item_id"] for e in run.events if e[1] == "final"]
        assert len(ids) == len(set(ids)), ids  # one final per item
    if name == "livekit-deepgram":  # every turn LiveKit opened was closed, the last one included
        kinds = run.kinds()
        assert kinds.count("start") == kinds.count("end") and kinds[-1] == "end", shown
        # a turn a sentence, give or take a pause; on a device seconds behind, two utterances that end in
        # one round are told in one `speech_final` (both closed with all their words, as one turn)
        assert 5 <= kinds.count("end") <= 13, shown
    elif name != "livekit-openai-server-vad":
        # the client's VAD closes the turns (at most one answer each; a pause inside a sentence may be one)
        closed = [e for e in run.events
                  if e[1] == "final" and e[2] and (e[3].get("closes") or name != "pipecat-deepgram")]
        assert len(closed) <= run.kinds().count("end"), shown
        # Pipecat's Deepgram service leaves endpointing at Deepgram's 10 ms: a sentence's last words come in
        # the answer to its Finalize or, when the server's endpoint came first, in a speech_final result.
        ended = [e for e in run.events if e[1] == "final" and e[2]
                 and (e[3].get("closes") or e[3].get("speech_final") or name != "pipecat-deepgram")]
        assert 7 <= len(ended), shown


def test_the_server_vad_alone_makes_an_item_a_sentence(runs):
    """LiveKit's `gpt-realtime-whisper` sends no `turn_detection`: OpenAI's server_vad defaults (500 ms) run,
    and each of the recording's pauses (about a second) ends an item."""
    out, _ = runs
    run = out["livekit-openai-server-vad"]
    assert 7 <= len(run.finals()) <= 13, run.finals()


def test_the_server_logged_no_error_and_no_traceback(runs):
    _, log = runs
    assert "Traceback" not in log and " ERROR " not in log, log
