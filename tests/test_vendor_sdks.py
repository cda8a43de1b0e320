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

import pytest

from bench.protocols_accuracy import all_protocols, mean_encoder_batch
from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.live import serve_app
from tests.real_speech import offline_pooled_wer, pooled, real_clips

pytestmark = pytest.mark.slow

CLIPS = ["read_librispeech_2412-153948-0000", "read_cmu_goforward", "conversational_mfa_surround"]
BOUND = 0.05


@pytest.fixture(scope="module")
def clips():
    return real_clips(CLIPS)


@pytest.fixture(scope="module")
def offline_wer(clips, tiny_en_checkpoint) -> float:
    return offline_pooled_wer(clips, tiny_en_checkpoint)


def test_both_vendor_sdks_and_asr_transcribe_real_speech_together_as_right_as_offline(clips, offline_wer,
                                                                                      tiny_en_checkpoint, tmp_path):
    config = ServerConfig(model=str(tiny_en_checkpoint), pcm_input=True, idle_unload_seconds=0, api_token="secret",
                          max_connections_per_gpu=3 * len(CLIPS), jobs_db=str(tmp_path / "jobs.sqlite"))
    with serve_app(create_app(config)) as base:
        asr, oa, dg = asyncio.run(all_protocols(base, clips, "secret"))
        metrics = mean_encoder_batch(base, "secret")
    names = [c.name for c in clips]
    texts = {
        "asr": dict(zip(names, (r.text for r in asr))),
        "openai": dict(zip(names, (t for t, _ in oa))),
        "deepgram": dict(zip(names, (t for t, _ in dg))),
    }
    for protocol, by_clip in texts.items():
        assert pooled(clips, by_clip) <= offline_wer + BOUND, (protocol, pooled(clips, by_clip), offline_wer, by_clip)
    for _, events in oa:
        _openai_order(events)
    for _, messages in dg:
        _deepgram_order(messages)
    assert metrics > 1.0  # the streams of all three protocols shared rounds on the one device


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
