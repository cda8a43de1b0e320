"""Deepgram's pre-recorded API, `POST /v1/listen`, over real sockets: the `deepgram-sdk`'s own
`transcribe_file` on real recordings (words right, in Deepgram's response shape), raw PCM with
`encoding`, and every refusal in Deepgram's error shape (`err_code`, `err_msg`, `request_id`)."""
from __future__ import annotations

import io
import json
import uuid
import wave

import httpx
import pytest

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import fake_loader, tone
from tests.live import serve_app
from tests.real_speech import offline_pooled_wer, pooled, real_clips

CLIPS = ["read_librispeech_2412-153948-0000", "read_cmu_goforward", "conversational_mfa_surround"]
BOUND = 0.05  # as /asr and the streaming protocols (tests/test_vendor_sdks.py)


def _wav(pcm: bytes, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return out.getvalue()


def _deepgram_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"err_code", "err_msg", "request_id"}, body
    uuid.UUID(body["request_id"])
    return body


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dg-fake")
    app = create_app(ServerConfig(simulate_gpus="1x16", api_token="secret", jobs_db=str(folder / "jobs.sqlite"),
                                  max_upload_mb=1), loader=fake_loader)
    with serve_app(app) as base:
        yield f"http://{base}"


def _post(base: str, body: bytes, query: str = "", content_type: str = "audio/wav", token: str = "secret",
          **kwargs) -> httpx.Response:
    return httpx.post(f"{base}/v1/listen{query}", content=body, timeout=120,
                      headers={"Authorization": f"Token {token}", "Content-Type": content_type}, **kwargs)


def test_a_url_body_is_refused_with_deepgrams_error_shape(fake):
    r = httpx.post(f"{fake}/v1/listen?model=nova-3", json={"url": "https://example.com/audio.wav"},
                   headers={"Authorization": "Token secret"}, timeout=30)
    body = _deepgram_error(r, 400)
    assert body["err_code"] == "Bad Request" and "URL" in body["err_msg"]


def test_empty_undecodable_and_unsupported_bodies_are_deepgram_errors(fake):
    assert "empty" in _deepgram_error(_post(fake, b""), 400)["err_msg"]
    undecodable = _deepgram_error(_post(fake, b"this is not audio at all" * 100, content_type="audio/mpeg"), 400)
    assert "failed to process audio" in undecodable["err_msg"]
    assert _deepgram_error(_post(fake, b"x" * (2 * 2**20), content_type="application/octet-stream"),
                           413)["err_code"] == "Payload Too Large"
    _deepgram_error(_post(fake, b"hello", content_type="text/plain"), 415)
    _deepgram_error(_post(fake, _wav(tone(1.0)), "?encoding=speex"), 400)
    _deepgram_error(_post(fake, _wav(tone(1.0)), "?callback=https://example.com/hook"), 400)
    assert _deepgram_error(_post(fake, _wav(tone(1.0)), token="wrong"), 401)["err_code"] == "INVALID_AUTH"


def test_raw_pcm_with_encoding_and_a_wav_file_give_the_same_words_in_deepgrams_shape(fake):
    pcm = tone(3.0)
    raw = _post(fake, pcm, "?encoding=linear16&sample_rate=16000&utterances=true&paragraphs=true",
                content_type="application/octet-stream")
    as_wav = _post(fake, _wav(pcm), "?utterances=true&paragraphs=true")
    for r in (raw, as_wav):
        assert r.status_code == 200, r.text
    raw, as_wav = raw.json(), as_wav.json()
    assert raw["metadata"]["duration"] == pytest.approx(3.0, abs=0.05) and raw["metadata"]["channels"] == 1
    alternative = raw["results"]["channels"][0]["alternatives"][0]
    assert alternative["words"] and [w["word"] for w in alternative["words"]] == \
        [w["word"] for w in as_wav["results"]["channels"][0]["alternatives"][0]["words"]]
    assert set(alternative["words"][0]) >= {"word", "start", "end", "confidence", "punctuated_word"}
    assert raw["results"]["utterances"] and alternative["paragraphs"]["paragraphs"]


@pytest.mark.slow
def test_the_deepgram_sdk_transcribes_real_recordings_as_right_as_offline(tiny_en_checkpoint, tmp_path):
    from deepgram import DeepgramClient
    from deepgram.environment import DeepgramClientEnvironment

    clips = real_clips(CLIPS)
    offline = offline_pooled_wer(clips, tiny_en_checkpoint)
    config = ServerConfig(model=str(tiny_en_checkpoint), idle_unload_seconds=0, api_token="secret",
                          jobs_db=str(tmp_path / "jobs.sqlite"))
    texts, raw_texts = {}, {}
    with serve_app(create_app(config)) as base:
        env = DeepgramClientEnvironment(base=f"http://{base}", production=f"ws://{base}", agent=f"ws://{base}",
                                        agent_rest=f"http://{base}")
        client = DeepgramClient(api_key="secret", environment=env)
        for clip in clips:
            response = client.listen.v1.media.transcribe_file(request=clip.path.read_bytes(), model="nova-3",
                                                              smart_format=True, utterances=True)
            alternative = response.results.channels[0].alternatives[0]
            texts[clip.name] = alternative.transcript
            starts = [w.start for w in alternative.words]
            assert starts == sorted(starts) and all(w.start <= w.end for w in alternative.words)
            assert alternative.transcript == " ".join(w.punctuated_word for w in alternative.words)
            assert response.metadata.duration == pytest.approx(clip.seconds, abs=0.1)
            assert " ".join(u.transcript for u in response.results.utterances) == alternative.transcript
            raw = client.listen.v1.media.transcribe_file(  # headerless samples; plain words, no punctuation
                request=clip.pcm16(), encoding="linear16",
                request_options={"additional_query_parameters": {"sample_rate": 16000}})
            raw_texts[clip.name] = raw.results.channels[0].alternatives[0].transcript
    assert pooled(clips, texts) <= offline + BOUND, (pooled(clips, texts), offline, texts)
    assert pooled(clips, raw_texts) <= offline + BOUND, (pooled(clips, raw_texts), offline, raw_texts)
