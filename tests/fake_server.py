"""The real `streamserver` serve path (flags, uvicorn, signals, drain) with fake models.

`python -m tests.fake_server [streamserver flags]`. With `FAKE_ASR_GATE=PATH` in the
environment, transcription waits while that file exists: a test holds a stream
mid-inference (and so holds the drain) for as long as it needs, with no timing.
`FAKE_ASR_SECONDS=S` makes every transcription take S seconds (a slow device).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from gpu_manager import Device
from streamserver.cli import parse_config, serve
from streamserver.engine.runtime import DeviceModels
from tests.fakes import EchoASR, fake_loader


class GatedASR(EchoASR):
    def __init__(self, gate: str | None, slow: float = 0.0) -> None:
        self.gate = gate
        self.slow = slow

    def transcribe(self, audio: np.ndarray, prompt: str = "", language: str | None = None):
        while self.gate and os.path.exists(self.gate):
            time.sleep(0.01)
        time.sleep(self.slow)
        return super().transcribe(audio, prompt, language)


def gated_loader(device: Device) -> DeviceModels:
    models = fake_loader(device)
    models.asr = GatedASR(os.environ.get("FAKE_ASR_GATE"), float(os.environ.get("FAKE_ASR_SECONDS", "0")))
    return models


if __name__ == "__main__":
    serve(parse_config(sys.argv[1:]), loader=gated_loader)
