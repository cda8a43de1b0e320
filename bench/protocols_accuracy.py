"""The vendor SDKs as clients of this server, on real speech: the `openai` package's realtime client
against `/v1/realtime?intent=transcription` and the `deepgram-sdk` against `/v1/listen`, beside `/asr`,
all at once on one server; pooled WER per protocol beside openai-whisper's `transcribe` with the same
weights, in the same run.

    python bench/protocols_accuracy.py [--model PATH] [--clips NAME ...]

Prints pooled WER (EnglishTextNormalizer on both sides) for offline Whisper, `/asr`, the OpenAI SDK and
the Deepgram SDK, and the mean encoder batch size (how much the protocols' streams shared rounds).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHUNK_SECONDS = 0.1
DEFAULT_CLIPS = ["read_cmu_goforward", "read_librispeech_2412-153948-0000", "read_librispeech_61-70968-0000",
                 "accented_arctic_axb_a0005", "conversational_mfa_surround", "conversational_mfa_crossword"]


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
                                  utterance_end_ms="1000", endpointing="2000") as conn:
        # endpointing 2000 ms, as the OpenAI session's silence above: both at the engine's own pause. Without
        # it Deepgram's default, 10 ms, runs, and each short pause cuts a separate decode (over the real-speech
        # set, tiny.en: about 4 points of pooled WER over 2 s; 300 ms: about 0.2).
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


def mean_encoder_batch(base: str, token: str) -> float:
    """The mean batch size of the device's encoder rounds, from /metrics."""
    import httpx

    text = httpx.get(f"http://{base}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("streamserver_batch_size_sum") and 'stage="encoder"' in line:
            total += float(line.rsplit(" ", 1)[1])
        if line.startswith("streamserver_batch_size_count") and 'stage="encoder"' in line:
            count += float(line.rsplit(" ", 1)[1])
    return total / count if count else 0.0


async def all_protocols(base: str, clips, token: str):
    """Every clip through `/asr`, the OpenAI SDK and the Deepgram SDK at once: three lists of texts."""
    from bench.accuracy import stream_clip

    loop = asyncio.get_running_loop()
    asr = [stream_clip(f"ws://{base}/asr?token={token}", c.pcm16()) for c in clips]
    oa = [loop.run_in_executor(None, openai_session, base, c.pcm16()) for c in clips]
    dg = [loop.run_in_executor(None, deepgram_session, base, c.pcm16()) for c in clips]
    return await asyncio.gather(asyncio.gather(*asr), asyncio.gather(*oa), asyncio.gather(*dg))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import whisper

    from bench.speech_set import DEFAULT_SET, load_clips, pooled_wer
    from streamserver.app import create_app
    from streamserver.config import ServerConfig
    from tests.live import serve_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache" / "streamserver" / "tiny.en.pt"))
    parser.add_argument("--clips", nargs="*", default=DEFAULT_CLIPS)
    args = parser.parse_args()
    clips = load_clips(DEFAULT_SET, args.clips)
    model = whisper.load_model(args.model, device="cpu")
    texts = {"offline": [model.transcribe(c.audio(), language="en", fp16=False)["text"] for c in clips]}
    del model
    token = "secret"  # the key the SDK clients above present
    config = ServerConfig(model=args.model, pcm_input=True, idle_unload_seconds=0, api_token=token,
                          max_connections_per_gpu=3 * len(clips), jobs_db=os.path.join("/tmp", "bench-jobs.sqlite"))
    with serve_app(create_app(config)) as base:
        asr, oa, dg = asyncio.run(all_protocols(base, clips, token))
        batch = mean_encoder_batch(base, token)
    texts.update({"asr": [r.text for r in asr], "openai": [t for t, _ in oa], "deepgram": [t for t, _ in dg]})
    print(f"{len(clips)} clips, {sum(c.seconds for c in clips):.1f} s of real speech, model {args.model}")
    for name, hyps in texts.items():
        print(f"{name:9s} pooled WER {100 * pooled_wer((c.reference, h) for c, h in zip(clips, hyps)):5.1f} %")
    print(f"mean encoder batch {batch:.2f}")


if __name__ == "__main__":
    main()
