"""A conversation of two distinct espeak-ng voices, with its ground truth, for diarization tests and benches."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
VOICES = {
    "A": ["-v", "en-us", "-p", "30", "-s", "150"],  # low, slower
    "B": ["-v", "en-us+f3", "-p", "75", "-s", "170"],  # high, faster
}
CONVERSATION = [
    ("A", "Good morning, I wanted to ask about the schedule for next week."),
    ("B", "Sure, the meeting moved to Thursday afternoon after lunch."),
    ("A", "That works for me, should I bring the quarterly report?"),
    ("B", "Yes please, and also the budget numbers for the new project."),
]


def speak(voice: str, text: str, path: Path) -> np.ndarray:
    subprocess.run(["espeak-ng", *VOICES[voice], "-w", str(path), text], check=True)
    pcm = subprocess.run(["sox", str(path), "-t", "s16", "-r", str(SAMPLE_RATE), "-c", "1", "-"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768


def make_conversation(tmp_dir: Path, turns: list[tuple[str, str]] = CONVERSATION, gap: float = 0.75,
                      lead: float = 0.5) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """The turns spoken one after another with `gap` seconds between; returns (audio, [(start, end, voice)])."""
    parts = [np.zeros(int(lead * SAMPLE_RATE), np.float32)]
    truth, t = [], lead
    for i, (voice, text) in enumerate(turns):
        audio = speak(voice, text, Path(tmp_dir) / f"turn{i}.wav")
        parts += [audio, np.zeros(int(gap * SAMPLE_RATE), np.float32)]
        truth.append((t, t + len(audio) / SAMPLE_RATE, voice))
        t += len(audio) / SAMPLE_RATE + gap
    return np.concatenate(parts), truth


def to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
