"""Silero VAD (16 kHz) as a stateless model shared by many streams, plus a segmenter.

The silero-vad package's JIT model keeps its LSTM state and audio context inside the
module, so one instance can serve only one stream.  Here the same network runs as a
plain ``nn.Module`` and every stream's recurrent state lives in its own
:class:`VadState`, so one :class:`SileroVAD` per device serves every connection and a
scheduler can batch windows from many streams into one forward.

Weights: in silero-vad 6.2.3 the shipped ``silero_vad_16k.safetensors`` holds
*different* (older) weights than ``silero_vad.jit`` and every ``*.onnx`` file, which
agree with each other; its probabilities differ from ``load_silero_vad()`` by up to
0.8.  So by default we read the tensors out of the JIT archive (``torch.jit.load`` of
the file only; nothing of the package runs) and map them by name; ``weights=
"safetensors"`` keeps the other file available.

We never ``import silero_vad``: its ``model.py`` calls ``torch.set_num_threads(1)`` at
import time, which would slow every other torch op in the process.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
WINDOW = 512  # new samples per step (32 ms)
CONTEXT = 64  # samples of the previous window prepended to each step's input
# The convolutions run over at most this many windows at a time, in row counts padded to a power of
# two: oneDNN keeps a compiled primitive per input shape, and a batch of every size the traffic
# happens to bring grew the server's memory for an hour (probe: +150 MB in 15 minutes of one stream).
BLOCK_WINDOWS = 64
_HIDDEN = 128


def _data_dir() -> Path:
    """The package's data folder, found without executing the package (see module doc)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed; it ships the VAD weights")
    return Path(spec.submodule_search_locations[0]) / "data"


def _load_weights(source: Literal["jit", "safetensors"]) -> dict[str, torch.Tensor]:
    """State dict for :class:`_SileroNet` from one of the package's files (module doc)."""
    if source == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(_data_dir() / "silero_vad_16k.safetensors"))
    jit = torch.jit.load(str(_data_dir() / "silero_vad.jit"), map_location="cpu")
    names = {"stft.forward_basis_buffer": "stft_conv.weight"}
    names.update({f"encoder.{i}.reparam_conv.{w}": f"conv{i + 1}.{w}" for i in range(4) for w in ("weight", "bias")})
    names.update({f"decoder.rnn.{w}": f"lstm_cell.{w}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    names.update({f"decoder.decoder.2.{w}": f"final_conv.{w}" for w in ("weight", "bias")})
    tensors = dict(jit._model.named_parameters()) | dict(jit._model.named_buffers())  # 16 kHz branch
    return {names[k]: t.detach().clone() for k, t in tensors.items() if k in names}


class _SileroNet(nn.Module):
    """Silero VAD 16 kHz net (as in tinygrad_model.py), split so only the LSTM is sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, _HIDDEN, 3, padding=1)
        self.lstm_cell = nn.LSTMCell(_HIDDEN, _HIDDEN)
        self.final_conv = nn.Conv1d(_HIDDEN, 1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[N, CONTEXT+WINDOW] audio -> [N, 128] features; windows are independent here."""
        x = F.pad(x.unsqueeze(1), (0, 64), mode="reflect")
        x = self.stft_conv(x)  # [N, 258, 4]: real and imaginary parts of a 256-point STFT
        x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return F.relu(self.conv4(x)).squeeze(-1)  # time axis is 1 after two stride-2 convs

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """[N, 128] LSTM output -> [N] speech probability."""
        return torch.sigmoid(self.final_conv(F.relu(h).unsqueeze(-1))).mean(dim=(1, 2))


@dataclass
class VadState:
    """One stream's VAD state; the model object itself holds none of this."""

    h: torch.Tensor | None = None  # [1, 128] LSTM hidden, on the model's device; None = zeros
    c: torch.Tensor | None = None  # [1, 128] LSTM cell
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    leftover: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


class SileroVAD:
    """Shared per device; holds no per-stream state."""

    def __init__(self, device: str | torch.device = "cpu", weights: Literal["jit", "safetensors"] = "jit") -> None:
        self.device = torch.device(device)
        net = _SileroNet()
        net.load_state_dict(_load_weights(weights), strict=True)  # strict: every name mapped
        self.net = net.eval().requires_grad_(False).to(self.device)
        self._zeros = torch.zeros(1, _HIDDEN, device=self.device)

    def new_state(self) -> VadState:
        return VadState()

    def _hc(self, states: list[VadState]) -> tuple[torch.Tensor, torch.Tensor]:
        hs = [s.h if s.h is not None else self._zeros for s in states]
        cs = [s.c if s.c is not None else self._zeros for s in states]
        if len(states) == 1:
            return hs[0], cs[0]
        return torch.cat(hs), torch.cat(cs)

    @torch.inference_mode()
    def step(self, states: list[VadState], windows: np.ndarray) -> np.ndarray:
        """Advance each stream by one window of WINDOW new samples in one batched forward.

        ``windows`` is float32 [B, WINDOW], row i belonging to ``states[i]``.  Returns the
        B speech probabilities and updates each state's h/c/context in place.
        """
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 2 or windows.shape != (len(states), WINDOW):
            raise ValueError(f"windows must be [{len(states)}, {WINDOW}], got {windows.shape}")
        x = np.empty((len(states), CONTEXT + WINDOW), np.float32)
        for i, s in enumerate(states):
            x[i, :CONTEXT] = s.context
        x[:, CONTEXT:] = windows
        xt = torch.from_numpy(x).to(self.device, non_blocking=True)
        h, c = self.net.lstm_cell(self.net.encode(xt), self._hc(states))
        probs = self.net.decode(h).float().cpu().numpy()
        for i, s in enumerate(states):
            s.h, s.c = h[i : i + 1], c[i : i + 1]
            s.context = x[i, -CONTEXT:].copy()
        return probs

    def probabilities(self, state: VadState, audio: np.ndarray) -> np.ndarray:
        """Feed one stream's audio (any length); one probability per completed window."""
        return self.probabilities_batch([state], [audio])[0]

    @torch.inference_mode()
    def probabilities_batch(self, states: list[VadState], audios: list[np.ndarray]) -> list[np.ndarray]:
        """Feed each stream its audio (any lengths) in one pass; per stream, one probability per
        completed window.

        Samples short of a full window wait in ``state.leftover``. Only the LSTM cell is
        recurrent: every window's input (its context is simply the preceding audio) is known
        up front, so the convolutional encoder and the decoder run once over all windows of
        all streams, and the loop does one batched LSTMCell call per window position, over
        the streams that have a window there.
        """
        bufs = [np.concatenate([s.leftover, np.asarray(a, np.float32).reshape(-1)]) for s, a in zip(states, audios)]
        counts = [len(b) // WINDOW for b in bufs]
        seqs, frames = [], []
        for s, b, n in zip(states, bufs, counts):
            seq = np.concatenate([s.context, b[: n * WINDOW]])  # CONTEXT + n*WINDOW samples
            seqs.append(seq)
            if n:
                frames.append(np.lib.stride_tricks.sliding_window_view(seq, CONTEXT + WINDOW)[::WINDOW])
        total = sum(counts)
        if total:
            feats = _in_blocks(self.net.encode,
                               torch.from_numpy(np.concatenate(frames).astype(np.float32)).to(self.device))
            offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            h, c = self._hc(states)
            h, c = h.clone(), c.clone()
            outs = torch.empty(total, h.shape[1], device=self.device, dtype=h.dtype)
            for t in range(max(counts)):
                rows = [i for i, n in enumerate(counts) if n > t]
                if len(rows) == len(states):
                    idx = torch.from_numpy(offsets + t).to(self.device)
                    h, c = self.net.lstm_cell(feats[idx], (h, c))
                    outs[idx] = h
                else:
                    r = torch.tensor(rows, device=self.device)
                    idx = torch.from_numpy(offsets[rows] + t).to(self.device)
                    hr, cr = self.net.lstm_cell(feats[idx], (h[r], c[r]))
                    h, c = h.index_copy(0, r, hr), c.index_copy(0, r, cr)
                    outs[idx] = hr
            probs = _in_blocks(self.net.decode, outs).float().cpu().numpy().reshape(-1)
        result = []
        start = 0
        for i, (s, b, n, seq) in enumerate(zip(states, bufs, counts, seqs)):
            if n:
                s.h, s.c = h[i : i + 1], c[i : i + 1]
                s.context = seq[-CONTEXT:].copy()
            s.leftover = b[n * WINDOW:].copy()
            result.append(probs[start:start + n] if n else np.zeros(0, np.float32))
            start += n
        return result


def _in_blocks(net: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """`net` over `rows` (independent rows) in blocks of `BLOCK_WINDOWS`, each padded with zero rows to
    a power of two: a handful of input shapes whatever the batch, the same output for every row."""
    outs = []
    for at in range(0, len(rows), BLOCK_WINDOWS):
        block = rows[at:at + BLOCK_WINDOWS]
        n = len(block)
        size = 1 << (n - 1).bit_length()
        if size > n:
            block = torch.cat([block, block.new_zeros((size - n, *block.shape[1:]))])
        outs.append(net(block)[:n])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


@dataclass(frozen=True)
class VadJob:
    """A session's request for its new audio's speech probabilities (the scheduler batches these)."""

    state: VadState
    audio: np.ndarray


@dataclass
class SpeechEvent:
    """A speech boundary, already widened by the segmenter's speech pad."""

    kind: Literal["start", "end"]
    sample: int  # absolute stream sample index at 16 kHz


def release_threshold(threshold: float) -> float:
    """The probability speech must fall below to stop being speech, once it started at `threshold`:
    Silero's hysteresis (`get_speech_timestamps`), so a wavering score does not chatter."""
    return max(threshold - 0.15, 0.01)


class SpeechSegmenter:
    """Turns one stream's per-window probabilities into start/end events (no torch).

    Follows silero's ``VADIterator``: speech starts at the first window with
    probability >= ``threshold``; it ends once probabilities have stayed below
    ``threshold - 0.15`` (hysteresis, so a wavering score does not chatter) for
    ``min_silence_ms``, a window back at >= ``threshold`` cancelling the pending end.
    The start is moved ``speech_pad_ms`` earlier and the end (the first silent
    window's start) ``speech_pad_ms`` later, so soft word edges are not cut.
    """

    def __init__(self, threshold: float = 0.5, min_silence_ms: int = 500, speech_pad_ms: int = 100) -> None:
        self.threshold = threshold
        self.neg_threshold = release_threshold(threshold)
        self.min_silence_samples = SAMPLE_RATE * min_silence_ms // 1000
        self.pad_samples = SAMPLE_RATE * speech_pad_ms // 1000
        self._windows = 0  # windows seen so far: the absolute clock
        self._triggered = False
        self._silence_from: int | None = None  # start sample of the pending silence

    def set_pause(self, seconds: float) -> None:
        """End speech once `seconds` of silence have been heard, as closely as the windows resolve it: at
        the end of the first window that reaches it (one window, 32 ms, at the least)."""
        windows = max(1, -(-round(seconds * SAMPLE_RATE) // WINDOW))
        self.min_silence_samples = (windows - 1) * WINDOW  # counted from the first silent window's start

    @property
    def in_speech(self) -> bool:
        return self._triggered

    @property
    def speech_end(self) -> int | None:
        """Where speech would end (with its pad) if the pause now under way lasts: None if none is."""
        return None if self._silence_from is None else self._silence_from + self.pad_samples

    @property
    def pause_remaining(self) -> int | None:
        """Samples of silence still to hear before the pause under way ends the speech (None: no pause)."""
        if self._silence_from is None:
            return None
        return self._silence_from + self.min_silence_samples + WINDOW - self._windows * WINDOW

    def force_end(self) -> None:
        """End the speech under way now (the caller ended the utterance); the next speech window starts anew."""
        self._triggered = False
        self._silence_from = None

    def push(self, probs: np.ndarray) -> list[SpeechEvent]:
        """Consume probabilities for the next consecutive WINDOW-sample windows."""
        events: list[SpeechEvent] = []
        for p in np.asarray(probs, dtype=np.float64).reshape(-1):
            begin = self._windows * WINDOW
            self._windows += 1
            if p >= self.threshold:
                self._silence_from = None
                if not self._triggered:
                    self._triggered = True
                    events.append(SpeechEvent("start", max(0, begin - self.pad_samples)))
            elif p < self.neg_threshold and self._triggered:
                if self._silence_from is None:
                    self._silence_from = begin
                # VADIterator measures from the end of the first silent window.
                if begin - self._silence_from >= self.min_silence_samples:
                    events.append(SpeechEvent("end", self._silence_from + self.pad_samples))
                    self._triggered = False
                    self._silence_from = None
        return events
