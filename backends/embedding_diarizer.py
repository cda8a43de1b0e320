"""Online speaker diarization from speaker embeddings, with weights that install with the project.

The speaker encoder is resemblyzer's (PyPI `resemblyzer`, which ships its
weights), shared per device. Each stream keeps its own speakers as centroids of
L2-normalised embeddings: a window close enough to a centroid (cosine) joins it,
otherwise it starts a new speaker, up to `max_speakers`.

Windows of `WINDOW_SECONDS` slide over each speech region (from the VAD
probabilities the session passes in) with hop `HOP_SECONDS`; a window labels
the first hop of its span, so a label is final `WINDOW_SECONDS` after the audio
it labels arrived (that is the latency), and the end of a region is labelled
when the VAD closes it. Silence is covered as soon as the VAD says so.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .diarization_types import SpeakerTurn

SAMPLE_RATE = 16000
WINDOW_SECONDS = 1.6  # resemblyzer's partial utterance
HOP_SECONDS = 0.8
MIN_SECONDS = 0.4  # shorter speech is labelled by its neighbours' speaker, not embedded
END_SILENCE_WINDOWS = 10  # 0.32 s of VAD silence closes a region
SIMILARITY_THRESHOLD = 0.75
VAD_WINDOW = 512

_WIN = int(WINDOW_SECONDS * SAMPLE_RATE)
_HOP = int(HOP_SECONDS * SAMPLE_RATE)


@dataclass
class EmbeddingState:
    samples: int = 0  # stream samples seen
    region_start: int | None = None  # absolute sample where the open speech region began
    region_audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    labelled_until: int = 0  # absolute sample up to which the open region is labelled
    last_speech_end: int = 0
    silent_windows: int = 0
    sums: list[np.ndarray] = field(default_factory=list)
    covered_until: float = 0.0


class EmbeddingDiarizer:
    def __init__(self, device: str | torch.device = "cpu", max_speakers: int = 4,
                 threshold: float = SIMILARITY_THRESHOLD) -> None:
        with warnings.catch_warnings():  # resemblyzer → webrtcvad imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            from resemblyzer import VoiceEncoder
            from resemblyzer.audio import wav_to_mel_spectrogram

        self._mel = wav_to_mel_spectrogram
        self.encoder = VoiceEncoder(device, verbose=False)
        self.max_speakers = max_speakers
        self.threshold = threshold

    def new_state(self) -> EmbeddingState:
        return EmbeddingState()

    def process(self, state: EmbeddingState, audio: np.ndarray, vad_probs: np.ndarray) -> list[SpeakerTurn]:
        turns: list[SpeakerTurn] = []
        for i, p in enumerate(vad_probs):
            window = audio[i * VAD_WINDOW:(i + 1) * VAD_WINDOW]
            start = state.samples
            state.samples += len(window)
            if p >= 0.5:
                if state.region_start is None:
                    state.region_start = state.labelled_until = start
                    state.region_audio = np.zeros(0, np.float32)
                state.silent_windows = 0
                state.last_speech_end = state.samples
            elif state.region_start is not None:
                state.silent_windows += 1
            if state.region_start is not None:
                state.region_audio = np.concatenate([state.region_audio, window])
                if state.silent_windows >= END_SILENCE_WINDOWS:
                    turns += self._close_region(state)
        if state.region_start is not None:
            turns += self._label_full_windows(state)
        self._update_coverage(state)
        return turns

    def flush(self, state: EmbeddingState) -> list[SpeakerTurn]:
        turns = self._close_region(state) if state.region_start is not None else []
        state.covered_until = state.samples / SAMPLE_RATE
        return turns

    # -- internals --------------------------------------------------------
    def _label_full_windows(self, state: EmbeddingState) -> list[SpeakerTurn]:
        """Every window that is now complete labels the hop at its start."""
        offsets = []
        while state.labelled_until - state.region_start + _WIN <= len(state.region_audio):
            offsets.append(state.labelled_until - state.region_start)
            state.labelled_until += _HOP
        if not offsets:
            return []
        labels = self._assign(state, [state.region_audio[o:o + _WIN] for o in offsets])
        return [SpeakerTurn((state.region_start + o) / SAMPLE_RATE, (state.region_start + o + _HOP) / SAMPLE_RATE,
                            label) for o, label in zip(offsets, labels)]

    def _close_region(self, state: EmbeddingState) -> list[SpeakerTurn]:
        """The region ended: label what is left from the last `WINDOW_SECONDS` of it."""
        turns = self._label_full_windows(state)
        end = max(state.last_speech_end, state.labelled_until)
        if end > state.labelled_until:
            tail = state.region_audio[: end - state.region_start][-_WIN:]
            if len(tail) >= MIN_SECONDS * SAMPLE_RATE:
                label = self._assign(state, [tail])[0]
            elif turns:
                label = turns[-1].speaker
            else:
                repeats = int(np.ceil(MIN_SECONDS * SAMPLE_RATE / max(len(tail), 1)))
                label = self._assign(state, [np.tile(tail, repeats)])[0]
            turns.append(SpeakerTurn(state.labelled_until / SAMPLE_RATE, end / SAMPLE_RATE, label))
        state.region_start = None
        state.region_audio = np.zeros(0, np.float32)
        state.labelled_until = end
        state.silent_windows = 0
        return turns

    def _update_coverage(self, state: EmbeddingState) -> None:
        if state.region_start is None:
            state.covered_until = state.samples / SAMPLE_RATE
        else:
            state.covered_until = max(state.covered_until, state.labelled_until / SAMPLE_RATE)

    def _assign(self, state: EmbeddingState, clips: list[np.ndarray]) -> list[int]:
        labels = []
        for emb in self._embed(clips):
            if state.sums:
                centroids = np.stack([s / np.linalg.norm(s) for s in state.sums])
                sims = centroids @ emb
                best = int(np.argmax(sims))
                if sims[best] < self.threshold and len(state.sums) < self.max_speakers:
                    best = len(state.sums)
                    state.sums.append(np.zeros_like(emb))
            else:
                best = 0
                state.sums.append(np.zeros_like(emb))
            state.sums[best] += emb
            labels.append(best)
        return labels

    @torch.inference_mode()
    def _embed(self, clips: list[np.ndarray]) -> np.ndarray:
        """L2-normalised embeddings; clips of the same length go through the LSTM as one batch."""
        mels = [self._mel(c.astype(np.float32)) for c in clips]
        out = np.zeros((len(clips), 256), np.float32)
        by_len: dict[int, list[int]] = {}
        for i, m in enumerate(mels):
            by_len.setdefault(len(m), []).append(i)
        for idx in by_len.values():
            batch = torch.from_numpy(np.stack([mels[i] for i in idx])).to(self.encoder.device)
            out[idx] = self.encoder(batch).cpu().numpy()
        return out
