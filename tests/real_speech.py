"""Real recordings from `../shared/speech` for the tests, and the offline bar they are held to."""
from __future__ import annotations

import pytest

from bench.speech_set import DEFAULT_SET, Clip, load_clips, pooled_wer


def real_clips(names: list[str]) -> list[Clip]:
    """The named clips of the set; the test is skipped where the set is not beside the repository."""
    if not (DEFAULT_SET / "manifest.tsv").exists():
        pytest.skip(f"the real-speech set is not at {DEFAULT_SET}")
    found = load_clips(DEFAULT_SET, names)
    assert sorted(c.name for c in found) == sorted(names)
    return found


def pooled(clips: list[Clip], texts: dict[str, str]) -> float:
    """Pooled WER of each clip's text (by clip name) against its reference."""
    return pooled_wer((c.reference, texts[c.name]) for c in clips)


def offline_pooled_wer(clips: list[Clip], checkpoint) -> float:
    """openai-whisper's `transcribe` with its default options on the same weights: the bar."""
    import whisper

    model = whisper.load_model(str(checkpoint), device="cpu")
    return pooled(clips, {c.name: model.transcribe(c.audio(), language="en", fp16=False)["text"] for c in clips})
