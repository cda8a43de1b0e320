"""The clients people already have, unchanged, on real speech: the `openai` package's realtime client
(`/v1/realtime?intent=transcription`) and the `deepgram-sdk` (`/v1/listen`), beside `/asr`, all at once
on one server with the real tiny.en weights.

Real recordings from `../shared/speech` are streamed at real-time pace through each endpoint at the
same time (one device: their steps share the device scheduler's batches). Each protocol's pooled WER
must stay within the bound `/asr` is held to (`tests/test_real_speech.py`: 5 points over openai-whisper's
`transcribe` with the same weights), and each protocol's events must come in their documented order.
"""
from __future__ import annotations

import asyncio
import base64
import threading
import time

import numpy as np
import pytest
from scipy.signal import resample_poly

from bench.accuracy import stream_clip
from bench.speech_set import DEFAULT_SET, edit_counts, load_clips
from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.live import serve_app

pytestmark = pytest.mark.slow

CLIPS = ["read_librispeech_2412-153948-0000", "read_cmu_goforward", "conversational_mfa_surround"]
BOUND = 0.05
CHUNK_SECONDS = 0.1


@pytest.fixture(scope="module")
def clips():
    if not (DEFAULT_SET / "manifest.tsv").exists():
        pytest.skip(f"the real-speech set is not at {DEFAULT_SET}")
    found = load_clips(DEFAULT_SET, CLIPS)
    assert sorted(c.name for c in found) == sorted(CLIPS)
    return found


@pytest.fixture(scope="module")
def offline_wer(clips, tiny_en_checkpoint) -> float:
    import whisper

    model = whisper.load_model(str(tiny_en_checkpoint), device="cpu")
    return _pooled(clips, {c.name: model.transcribe(c.audio(), language="en", fp16=False)["text"] for c in clips})


def _pooled(clips, texts: dict[str, str]) -> float:
    counts = [edit_counts(c.reference, texts[c.name]) for c in clips]
    return sum(e for e, _ in counts) / sum(n for _, n in counts)


def openai_session(base: str, pcm16k: bytes) -> tuple[str, list[dict]]:
    """One clip through the OpenAI SDK's realtime client: the completed transcripts joined, and the events."""
    from openai import OpenAI

    audio = np.frombuffer(pcm16k, dtype="<i2").astype(np.float32)
    pcm24k = np.clip(resample_poly(audio, 3, 2), -32768, 32767).astype("<i2").tobytes()
    client = OpenAI(base_url=f"http://{base}/v1", api_key="secret")
    events: list[dict] = []
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        conn.session.update(session={"type": "transcription", "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 2000}}}})

        def send() -> None:
            step = int(24000 * 2 * CHUNK_SECONDS)
            for i in range(0, len(pcm24k), step):
                conn.input_audio_buffer.append(audio=base64.b64encode(pcm24k[i:i + step]).decode())
                time.sleep(CHUNK_SECONDS)
            conn.input_audio_buffer.commit()

        sender = threading.Thread(target=send)
        sender.start()
        sender.join()
        while True:  # after the commit, every item ends with its `completed`
            event = conn.recv().to_dict()
            events.append(event)
            open_items = {e["item_id"] for e in events if e["type"].endswith(".delta") or
                          e["type"] == "input_audio_buffer.speech_started"}
            done = {e["item_id"] for e in events if e["type"].endswith(".completed")}
            if event["type"].endswith(".completed") and open_items <= done:
                break
    completed = [e["transcript"] for e in events if e["type"].endswith(".completed")]
    return " ".join(completed), events


def deepgram_session(base: str, pcm16k: bytes) -> tuple[str, list]:
    """One clip through the Deepgram SDK: the final transcripts joined, and the messages."""
    from deepgram import DeepgramClient
    from deepgram.environment import DeepgramClientEnvironment

    env = DeepgramClientEnvironment(base=f"http://{base}", production=f"ws://{base}", agent=f"ws://{base}",
                                    agent_rest=f"http://{base}")
    client = DeepgramClient(api_key="secret", environment=env)
    messages = []
    with client.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate="16000", channels="1",
                                  interim_results="true", punctuate="true", vad_events="true",
                                  utterance_end_ms="1000") as conn:
        def send() -> None:
            step = int(16000 * 2 * CHUNK_SECONDS)
            for i in range(0, len(pcm16k), step):
                conn.send_media(pcm16k[i:i + step])
                time.sleep(CHUNK_SECONDS)
            conn.send_finalize()
            conn.send_close_stream()

        sender = threading.Thread(target=send)
        sender.start()
        for message in conn:  # until the server's close after Metadata
            messages.append(message)
        sender.join()
    finals = [m.channel.alternatives[0].transcript for m in messages if m.type == "Results" and m.is_final]
    return " ".join(t for t in finals if t), messages


def test_both_vendor_sdks_and_asr_transcribe_real_speech_together_as_right_as_offline(clips, offline_wer,
                                                                                      tiny_en_checkpoint, tmp_path):
    config = ServerConfig(model=str(tiny_en_checkpoint), pcm_input=True, idle_unload_seconds=0, api_token="secret",
                          max_connections_per_gpu=3 * len(CLIPS), jobs_db=str(tmp_path / "jobs.sqlite"))
    with serve_app(create_app(config)) as base:
        async def everything():
            loop = asyncio.get_running_loop()
            asr = [stream_clip(f"ws://{base}/asr?token=secret", c.pcm16()) for c in clips]
            oa = [loop.run_in_executor(None, openai_session, base, c.pcm16()) for c in clips]
            dg = [loop.run_in_executor(None, deepgram_session, base, c.pcm16()) for c in clips]
            return await asyncio.gather(asyncio.gather(*asr), asyncio.gather(*oa), asyncio.gather(*dg))

        asr, oa, dg = asyncio.run(everything())
        metrics = _batch_sizes(base)
    names = [c.name for c in clips]
    texts = {
        "asr": dict(zip(names, (r.text for r in asr))),
        "openai": dict(zip(names, (t for t, _ in oa))),
        "deepgram": dict(zip(names, (t for t, _ in dg))),
    }
    for protocol, by_clip in texts.items():
        assert _pooled(clips, by_clip) <= offline_wer + BOUND, (protocol, _pooled(clips, by_clip), offline_wer, by_clip)
    for _, events in oa:
        _openai_order(events)
    for _, messages in dg:
        _deepgram_order(messages)
    assert metrics > 1.0  # the streams of all three protocols shared rounds on the one device


def _batch_sizes(base: str) -> float:
    """The mean batch size of the device's encoder rounds, from /metrics."""
    import httpx

    text = httpx.get(f"http://{base}/metrics", headers={"Authorization": "Bearer secret"}).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("streamserver_batch_size_sum") and 'stage="encoder"' in line:
            total += float(line.rsplit(" ", 1)[1])
        if line.startswith("streamserver_batch_size_count") and 'stage="encoder"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return total / count if count else 0.0


def _openai_order(events: list[dict]) -> None:
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["session.created", "session.updated"], kinds[:3]
    items: dict[str, list[str]] = {}
    for e in events:
        if "item_id" in e:
            items.setdefault(e["item_id"], []).append(e["type"])
    assert items
    for item_id, seq in items.items():
        assert seq[-2:] == ["input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed"], seq
        if "input_audio_buffer.speech_started" in seq:
            assert seq[0] == "input_audio_buffer.speech_started" and "input_audio_buffer.speech_stopped" in seq, seq
        deltas = "".join(e["delta"] for e in events if e.get("item_id") == item_id and e["type"].endswith(".delta"))
        completed = next(e for e in events if e.get("item_id") == item_id and e["type"].endswith(".completed"))
        assert deltas == completed["transcript"]  # the deltas add up to the item's transcript


def _deepgram_order(messages: list) -> None:
    kinds = [m.type for m in messages]
    assert kinds[-1] == "Metadata" and kinds.count("Metadata") == 1, kinds
    assert "Results" in kinds and kinds.index("SpeechStarted") < kinds.index("Results")
    finals = [m for m in messages if m.type == "Results" and m.is_final]
    starts = [w.start for m in finals for w in m.channel.alternatives[0].words]
    assert starts == sorted(starts)
    assert any(m.from_finalize for m in finals) or any(m.speech_final for m in finals)
