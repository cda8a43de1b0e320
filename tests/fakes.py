"""Test doubles: a fake NVML with configurable GPUs, and models that need no weights."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from backends.asr_types import Segment, Word
from gpu_manager import GIB, Device
from streamserver.engine.runtime import DeviceModels


@dataclass
class FakeNvml:
    """Looks like `gpu_manager.Nvml`: `count` GPUs of `gigabytes` each."""

    count: int = 4
    gigabytes: float = 16.0
    used: dict[int, int] = field(default_factory=dict)

    def device_count(self) -> int:
        return self.count

    def name(self, index: int) -> str:
        return "NVIDIA Fake-16GB"

    def memory(self, index: int) -> tuple[int, int, int]:
        total = int(self.gigabytes * GIB)
        used = self.used.get(index, int(0.5 * GIB))
        return used, total - used, total

    def utilization(self, index: int) -> float:
        return 12.5


class EchoASR:
    """Stands in for Whisper: one word per second of audio, named by its index: `q` for a quiet
    second (level 0.01-0.1), else `w` (so two utterances of different audio say different words);
    nothing for a second of faint noise (level 0-0.005), as Whisper says nothing over a pause."""

    def transcribe(self, audio: np.ndarray, prompt: str = "", language: str | None = None) -> list[Segment]:
        n = int(len(audio) // 16000)
        levels = [float(np.abs(audio[i * 16000:(i + 1) * 16000]).mean()) for i in range(n)]
        words = tuple(Word(float(i), float(i) + 0.8, f" {'q' if 0.01 < lv < 0.1 else 'w'}{i}")
                      for i, lv in enumerate(levels) if not 0 < lv < 0.005)
        return [Segment(0.0, float(n), words)] if words else []

    def transcribe_batch(self, jobs) -> list[list[Segment]]:
        return [self.transcribe(job.audio, job.prompt, job.language) for job in jobs]


class LoudVAD:
    """Stands in for Silero: every window with energy is speech."""

    def __init__(self) -> None:
        from backends.vad import WINDOW

        self.window = WINDOW

    def new_state(self):
        return {"left": np.zeros(0, dtype=np.float32)}

    def probabilities(self, state, audio: np.ndarray) -> np.ndarray:
        audio = np.concatenate([state["left"], audio])
        n = len(audio) // self.window
        state["left"] = audio[n * self.window:]
        frames = audio[: n * self.window].reshape(n, self.window) if n else np.zeros((0, self.window))
        return (np.abs(frames).mean(axis=1) > 0.01).astype(np.float32)


def tone(seconds: float, amplitude: float = 0.3) -> bytes:
    """A 300 Hz tone as PCM s16le 16 kHz: speech to `LoudVAD`, one `EchoASR` word a second."""
    t = np.arange(int(seconds * 16000)) / 16000
    return (amplitude * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes()


def fake_loader(device: Device) -> DeviceModels:
    return DeviceModels(asr=EchoASR(), vad=LoudVAD(), names=["whisper:fake", "vad:fake"],
                        model_bytes=100 * 2**20, stream_bytes=2**20)


def runtime_with(asr):
    """A simulated device's runtime whose fake models use `asr` (scheduler tests)."""
    from gpu_manager import discover
    from streamserver.engine.runtime import DeviceRuntime

    def loader(device: Device) -> DeviceModels:
        models = fake_loader(device)
        models.asr = asr
        return models

    return DeviceRuntime(discover(simulate="1x16").devices[0], loader, idle_unload_seconds=0)


@dataclass
class _LevelState:
    covered_until: float = 0.0
    samples: int = 0


class LevelDiarizer:
    """Stands in for a diarizer: loud audio is speaker 0, quiet audio speaker 1, labelled 1 s late."""

    lag_seconds = 1.0

    def new_state(self) -> _LevelState:
        return _LevelState()

    def process(self, state: _LevelState, audio: np.ndarray, vad_probs: np.ndarray) -> list:
        from backends.diarization_types import SpeakerTurn

        turns = []
        for i in range(0, len(audio) - 1599, 1600):  # 0.1-s frames
            t = (state.samples + i) / 16000
            level = float(np.abs(audio[i:i + 1600]).mean())
            if level > 0.01:
                turns.append(SpeakerTurn(t, t + 0.1, 0 if level > 0.1 else 1))
        state.samples += len(audio)
        state.covered_until = max(0.0, state.samples / 16000 - self.lag_seconds)
        return turns

    def flush(self, state: _LevelState) -> list:
        state.covered_until = state.samples / 16000
        return []

    def process_batch(self, jobs: list) -> list[list]:
        self.batches = getattr(self, "batches", []) + [len(jobs)]  # what the scheduler handed in at once
        return [self.flush(j.state) if j.flush else self.process(j.state, j.audio, j.vad_probs) for j in jobs]


def fake_loader_with_diarizer(device: Device) -> DeviceModels:
    models = fake_loader(device)
    models.diarizer = LevelDiarizer()
    models.names.append("diarization:fake")
    return models
