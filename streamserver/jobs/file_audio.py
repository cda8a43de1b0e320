"""A whole uploaded file → 16 kHz mono float32, and its cut into chunks at speech pauses.

PyAV reads any container/codec FFmpeg knows, straight from the file on disk
(uploads are never held in memory as bytes). Chunks are at most `max_seconds`
long and end in the longest pause the VAD finds near their end, so no word is
cut in two and Whisper sees whole phrases.
"""
from __future__ import annotations

import numpy as np

from backends.vad import WINDOW, SileroVAD

SAMPLE_RATE = 16000


class FileDecodeError(Exception):
    """The file is not audio PyAV can decode; the message is the decoder's reason."""


def decode_file(path: str) -> np.ndarray:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise FileDecodeError("no audio stream in the file")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            pieces: list[np.ndarray] = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
    except FileDecodeError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)  # FFmpeg's words, without our file's path
        raise FileDecodeError(f"not a decodable audio file: {reason}") from None
    audio = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    if not audio.size:
        raise FileDecodeError("the file holds no audio samples")
    return audio


def cut_at_pauses(audio: np.ndarray, vad: SileroVAD, max_seconds: float = 30.0,
                  min_seconds: float = 10.0) -> list[tuple[float, float]]:
    """Spans (seconds) covering the audio, each at most `max_seconds`, ending in the quietest stretch
    (lowest speech probability over ~0.3 s) between `min_seconds` and `max_seconds` into the span."""
    state = vad.new_state()
    probs = vad.probabilities(state, audio)
    step = WINDOW / SAMPLE_RATE
    total = len(audio) / SAMPLE_RATE
    smooth = np.convolve(probs, np.ones(9) / 9, mode="same") if len(probs) else probs
    spans, start = [], 0.0
    while total - start > max_seconds:
        lo, hi = int((start + min_seconds) / step), int((start + max_seconds) / step)
        window = smooth[lo:hi]
        cut = (lo + int(np.argmin(window))) * step if len(window) else start + max_seconds
        spans.append((start, cut))
        start = cut
    spans.append((start, total))
    return spans


def speaker_turns(audio: np.ndarray, diarizer, vad: SileroVAD) -> list[tuple[float, float, int]]:
    """A whole file through the diarizer at once, clustered as a whole: [(start, end, backend label)]."""
    state = diarizer.new_state(whole=True)
    probs = vad.probabilities(vad.new_state(), audio)
    turns = diarizer.process(state, audio[: len(probs) * WINDOW], probs) + diarizer.flush(state)
    return [(t.start, t.end, int(t.speaker)) for t in turns]


def with_speakers(words: list[dict], turns: list[tuple[float, float, int]]) -> tuple[list[dict], list[dict]]:
    """Each word gets the speaker with the most overlap (else the nearest turn), numbered 1, 2, ...
    in order of first appearance in the words, as live captions number them; and the turns themselves
    with the same numbers (a speaker no word went to numbered after those), as `{start, end, speaker}`."""
    numbers: dict[int, int] = {}
    out = []
    for w in words:
        best = max(turns, key=lambda t: (min(t[1], w["end"]) - max(t[0], w["start"]),
                                         -min(abs(t[0] - w["end"]), abs(t[1] - w["start"]))))
        label = numbers.setdefault(best[2], len(numbers) + 1)
        out.append({**w, "speaker": label})
    spans = [{"start": round(a, 2), "end": round(b, 2), "speaker": numbers.setdefault(label, len(numbers) + 1)}
             for a, b, label in sorted(turns)]
    return out, spans
