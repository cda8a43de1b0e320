"""A turn's end carries all of its words, on both vendor protocols, on real speech at real-time pace.

Voice-agent frameworks end the user's turn at Deepgram's `speech_final` and at OpenAI's `completed`
(LiveKit's Deepgram and OpenAI plugins, Pipecat's OpenAI one): a word told after that event starts a
turn of its own that never ends, and the agent answers a sentence cut short. The ten-sentence telephone
recording (a pause after each sentence) goes through `/v1/listen` and `/v1/realtime` at once, with a
500-ms endpointing / `silence_duration_ms`, as `bench/turn_latency.py` streams it.
"""
from __future__ import annotations

import pytest

from bench.turn_latency import both
from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.live import serve_app
from tests.metrics_text import scrape, value
from tests.real_speech import offline_pooled_wer, pooled, real_clips

pytestmark = pytest.mark.slow

CLIP = "telephone_osr_us_000_0034_8k"
BOUND = 0.05


def test_every_turn_closes_after_its_last_word_on_deepgram_and_openai(tiny_en_checkpoint, tmp_path):
    clips = real_clips([CLIP])
    config = ServerConfig(model=str(tiny_en_checkpoint), pcm_input=True, idle_unload_seconds=0, api_token="secret",
                          jobs_db=str(tmp_path / "jobs.sqlite"))
    with serve_app(create_app(config)) as base:
        deepgram, openai = both(base, clips[0].pcm16(), 500, "secret")
        metrics = scrape(base, "secret")
    offline = offline_pooled_wer(clips, tiny_en_checkpoint)
    for name, log in (("deepgram", deepgram), ("openai", openai)):
        assert not log.errors and log.close_code in (None, 1000), (name, log.errors, log.close_code)
        assert log.late_words == [], (name, log.late_words, [t.text for t in log.turns])
        # one turn per sentence, give or take a pause the speaker left short or long
        assert 7 <= len(log.turns) <= 13, (name, [t.text for t in log.turns])
        assert pooled(clips, {CLIP: log.text}) <= offline + BOUND, (name, log.text)
    # Prometheus has every turn's wait, from the end of its speech (the 500-ms silence included)
    count = value(metrics, "streamserver_turn_end_seconds_count", gpu_id=0)
    assert count >= len(deepgram.turns) + len(openai.turns) - 2
    assert 0.5 <= value(metrics, "streamserver_turn_end_seconds_sum", gpu_id=0) / count < 10
