"""Raw audio at any rate and channel count, as other vendors' clients send it: 16-bit linear PCM
(`linear16`, OpenAI's `audio/pcm`), G.711 mu-law and A-law (`mulaw`/`audio/pcmu`, `alaw`/`audio/pcma`).

Channels are averaged to mono; other rates go through PyAV's `AudioResampler` (a streaming
resampler: frames fed in pieces come out as one continuous signal, with no edge at each piece).
`flush` hands out what the resampler still holds and leaves the decoder ready for more audio
(OpenAI's `input_audio_buffer.commit` flushes mid-stream, and the client goes on appending).
"""
from __future__ import annotations

import numpy as np

from .containers import AudioDecodeError
from .decoders import SAMPLE_RATE

ENCODINGS = ("linear16", "mulaw", "alaw")
_EMPTY = np.zeros(0, dtype=np.float32)


def _mulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    sign, exponent, mantissa = a & 0x80, (a >> 4) & 0x07, a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return np.where(sign, magnitude, -magnitude).astype(np.int16)


_TABLES = {"mulaw": _mulaw_table(), "alaw": _alaw_table()}


class RawDecoder:
    """`encoding` samples at `rate` Hz, `channels` interleaved → float32 mono at 16 kHz."""

    def __init__(self, encoding: str = "linear16", rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"unsupported encoding {encoding!r} (use {', '.join(ENCODINGS)})")
        if not 8000 <= rate <= 192000 or not 1 <= channels <= 8:
            raise ValueError(f"unsupported sample rate {rate} or channel count {channels}")
        self.format = encoding
        self.encoding, self.rate, self.channels = encoding, rate, channels
        self._frame_bytes = channels * (2 if encoding == "linear16" else 1)
        self._carry = b""
        self._resampler = None
        self._pts = 0

    def feed(self, data: bytes) -> np.ndarray:
        data, self._carry = self._carry + data, b""
        cut = len(data) - len(data) % self._frame_bytes
        data, self._carry = data[:cut], data[cut:]
        if not data:
            return _EMPTY
        if self.encoding == "linear16":
            samples = np.frombuffer(data, dtype="<i2")
        else:
            samples = _TABLES[self.encoding][np.frombuffer(data, dtype=np.uint8)]
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels).astype(np.int32).mean(axis=1).astype(np.int16)
        if self.rate == SAMPLE_RATE:
            return samples.astype(np.float32) * np.float32(1 / 32768)
        return self._resample(samples)

    def flush(self) -> np.ndarray:
        """Everything fed so far (a trailing part-sample is dropped). The decoder stays usable: a
        drained PyAV resampler refuses more frames (EOF), so the next `feed` starts a fresh one."""
        self._carry = b""
        if self._resampler is None:
            return _EMPTY
        import av

        resampler, self._resampler, self._pts = self._resampler, None, 0
        try:
            return self._collect(resampler.resample(None))
        except (av.error.FFmpegError, ValueError) as exc:
            raise AudioDecodeError(f"resampling failed: {exc}") from exc

    def _resample(self, samples: np.ndarray) -> np.ndarray:
        import av

        if self._resampler is None:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        self._pts += len(samples)
        try:
            return self._collect(self._resampler.resample(frame))
        except (av.error.FFmpegError, ValueError) as exc:
            raise AudioDecodeError(f"resampling failed: {exc}") from exc

    @staticmethod
    def _collect(frames) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        return np.concatenate(parts).astype(np.float32) if parts else _EMPTY
