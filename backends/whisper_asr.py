"""Whisper transcription with word times, through openai-whisper's model code.

One `WhisperASR` wraps one loaded model on one device and is shared by every
stream on that device; it keeps no per-stream state (the policy passes the
audio and the prompt each time).
"""
from __future__ import annotations

import numpy as np
import torch
import whisper

from .asr_types import Segment, Word


class WhisperASR:
    """Greedy decoding with word timestamps; no temperature fallback (it would make latency unbounded)."""

    def __init__(self, model: whisper.model.Whisper, language: str | None, name: str = "") -> None:
        self.model = model
        self.name = name
        self.language = None if language in (None, "auto") else language
        self.fp16 = model.device.type == "cuda"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def transcribe(self, audio: np.ndarray, prompt: str = "", language: str | None = None) -> list[Segment]:
        """Segments of `audio` (16 kHz float32), times relative to its first sample."""
        if audio.size == 0:
            return []
        lang = language if language not in (None, "auto") else self.language
        result = self.model.transcribe(
            audio.astype(np.float32, copy=False),
            language=lang,
            task="transcribe",
            temperature=0.0,
            word_timestamps=True,
            condition_on_previous_text=True,
            initial_prompt=prompt or None,
            fp16=self.fp16,
            verbose=None,
        )
        segments = []
        for seg in result["segments"]:
            words = tuple(Word(float(w["start"]), float(w["end"]), w["word"]) for w in seg.get("words", []))
            if words:
                segments.append(Segment(float(seg["start"]), float(seg["end"]), words))
        return segments

    def stream_bytes(self) -> int:
        """Device memory one stream's transcription state needs at most.

        A 30-s audio window (float32), its mel and encoder output, and the
        decoder's self- and cross-attention key/value caches for a full context.
        """
        d = self.model.dims
        itemsize = 2 if self.fp16 else 4
        audio = 30 * 16000 * 4
        mel = d.n_mels * 3000 * itemsize
        encoded = d.n_audio_ctx * d.n_audio_state * itemsize
        self_kv = 2 * d.n_text_layer * d.n_text_ctx * d.n_text_state * itemsize
        cross_kv = 2 * d.n_text_layer * d.n_audio_ctx * d.n_text_state * itemsize
        return audio + mel + encoded + self_kv + cross_kv

    def warm_up(self) -> None:
        """One short transcription, so the first client doesn't pay for numba's JIT and lazy inits."""
        t = np.arange(16000, dtype=np.float32) / 16000
        self.transcribe(0.01 * np.sin(2 * np.pi * 220 * t).astype(np.float32))
