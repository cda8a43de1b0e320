"""Incremental audio decoding: client WebSocket frames -> 16 kHz mono float32.

Why in-process: an ffmpeg subprocess per connection costs a process, pipes and
latency.  Containers are split by our own incremental demuxers
(``containers.py``); packets go straight to PyAV's codec layer and
``AudioResampler``, which cost microseconds per 20 ms Opus packet.

Timing is exact: the Opus pre-skip is dropped at the start (we zero it in the
extradata and drop it ourselves, so it doesn't depend on the libavcodec
version), and end trimming (Ogg EOS granule, Matroska DiscardPadding) is honoured.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

try:  # a dependency of the package; optional only where nothing but PCM is decoded
    import av
    import av.error
except ImportError:  # pragma: no cover - exercised on the bare GPU bench machine
    av = None

from .containers import AudioDecodeError, Demuxer, OggDemuxer, Packet, WebmDemuxer, _MAGIC

__all__ = ["AudioDecodeError", "Decoder", "FORMATS", "SAMPLE_RATE", "make_decoder"]

SAMPLE_RATE = 16000
FORMATS = ("pcm", "webm", "ogg", "auto")
_EMPTY = np.zeros(0, dtype=np.float32)


class Decoder(Protocol):
    """feed()/flush() return float32 mono at SAMPLE_RATE in [-1, 1], possibly empty."""

    @property
    def format(self) -> str: ...

    def feed(self, data: bytes) -> np.ndarray: ...

    def flush(self) -> np.ndarray: ...


class PcmDecoder:
    """s16le 16 kHz mono; an odd trailing byte waits for the next frame."""

    format = "pcm"

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes) -> np.ndarray:
        if self._carry:
            data, self._carry = self._carry + data, b""
        if len(data) & 1:
            data, self._carry = data[:-1], data[-1:]
        return np.frombuffer(data, dtype="<i2").astype(np.float32) * np.float32(1 / 32768)

    def flush(self) -> np.ndarray:
        self._carry = b""  # half a sample: nothing to return
        return _EMPTY


class ContainerDecoder:
    """Demuxer + PyAV codec + resampler, created lazily once the track is known."""

    def __init__(self, fmt: str, demuxer: Demuxer) -> None:
        self.format = fmt
        self._demux = demuxer
        if av is None:
            raise AudioDecodeError(f"{fmt} needs PyAV, which is not installed")
        self._ctx: av.AudioCodecContext | None = None
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._skip = 0  # codec-rate samples still to drop at the start (pre-skip)
        self._total = 0  # codec-rate samples decoded so far, pre-skip included

    def feed(self, data: bytes) -> np.ndarray:
        out: list[np.ndarray] = []
        self._decode(self._demux.feed(data), out)
        return _join(out)

    def flush(self) -> np.ndarray:
        out: list[np.ndarray] = []
        self._decode(self._demux.close(), out)
        if self._ctx is not None:
            try:
                frames = self._ctx.decode(None)
            except (av.error.FFmpegError, ValueError) as e:
                raise AudioDecodeError(f"invalid {self._ctx.name} data at end of stream: {e}")
            for f in frames:
                self._resample(f, out)
        self._resample(None, out)
        return _join(out)

    def _open(self, offset: int) -> av.AudioCodecContext:
        track = self._demux.track
        if track is None:  # the demuxers only emit packets after the headers
            raise AudioDecodeError(f"invalid data at byte {offset} (audio before codec header)")
        ctx = av.CodecContext.create(track.codec, "r")
        extradata = track.extradata
        if track.codec == "opus":  # we drop the pre-skip ourselves, see module doc
            extradata = extradata[:10] + b"\0\0" + extradata[12:]
            self._skip = track.pre_skip
        ctx.extradata = extradata
        try:
            ctx.open()
        except (av.error.FFmpegError, ValueError) as e:
            raise AudioDecodeError(f"bad {track.codec} header: {e}") from None
        return ctx  # type: ignore[return-value]

    def _decode(self, packets: list[Packet], out: list[np.ndarray]) -> None:
        """Decode, trim (pre-skip, end padding) and resample packets, appending to out."""
        for pk in packets:
            ctx = self._ctx = self._ctx or self._open(pk.offset)
            try:
                frames = ctx.decode(_padded_packet(pk.data))
            except (av.error.FFmpegError, ValueError) as e:
                raise AudioDecodeError(f"invalid {ctx.name} packet at byte {pk.offset}: {e}")
            n = sum(f.samples for f in frames)
            keep = n  # how many of this packet's samples survive end trimming
            if pk.discard_ns > 0 and frames:
                keep = n - round(pk.discard_ns * frames[0].sample_rate / 1e9)
            if pk.end_granule is not None:
                keep = min(keep, pk.end_granule - self._total)
            self._total += n
            for f in frames:
                lo, hi = min(self._skip, f.samples), min(f.samples, max(keep, 0))
                self._skip -= lo
                keep -= f.samples
                if lo or hi < f.samples:
                    f = _slice(f, lo, hi)
                if f is not None:
                    self._resample(f, out)

    def _resample(self, frame: av.AudioFrame | None, out: list[np.ndarray]) -> None:
        out.extend(r.to_ndarray()[0] for r in self._resampler.resample(frame))


def _join(parts: list[np.ndarray]) -> np.ndarray:
    """One float32 array in [-1, 1] (Opus may overshoot full scale slightly)."""
    if not parts:
        return _EMPTY
    pcm = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
    return np.clip(pcm, -1.0, 1.0, out=pcm)


def _padded_packet(data: bytes) -> av.Packet:
    """A packet owning a copy of data followed by FFmpeg's zeroed input padding.

    av.Packet(bytes) points at the bytes object itself, with no padding after it;
    decoders read a little past the end, so their output then depended on whatever
    followed in memory (the same stream decoded differently from run to run).
    """
    pkt = av.Packet(len(data))  # av_new_packet: zeroed padding
    memoryview(pkt)[:] = data
    return pkt


def _slice(frame: av.AudioFrame, lo: int, hi: int) -> av.AudioFrame | None:
    """Samples [lo, hi) of a decoded frame as a new frame (None if empty)."""
    if hi <= lo:
        return None
    arr = frame.to_ndarray()
    arr = arr[:, lo:hi] if frame.format.is_planar else arr[:, lo * len(frame.layout.channels) :
                                                           hi * len(frame.layout.channels)]
    new = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=frame.format.name,
                                     layout=frame.layout.name)
    new.sample_rate = frame.sample_rate
    return new


class AutoDecoder:
    """Picks webm or ogg from the first 4 bytes; fails as soon as neither can match."""

    def __init__(self) -> None:
        self._head = b""
        self._inner: ContainerDecoder | None = None

    @property
    def format(self) -> str:
        return self._inner.format if self._inner else "auto"

    def feed(self, data: bytes) -> np.ndarray:
        if self._inner is None:
            self._head += data
            fmts = [f for f, m in _MAGIC.items() if self._head[:4] == m[: len(self._head)]]
            if not fmts:
                raise AudioDecodeError("invalid data at byte 0")
            if len(self._head) < 4:
                return _EMPTY
            self._inner = _container(fmts[0])
            data, self._head = self._head, b""
        return self._inner.feed(data)

    def flush(self) -> np.ndarray:
        return self._inner.flush() if self._inner else _EMPTY


def _container(fmt: str) -> ContainerDecoder:
    return ContainerDecoder(fmt, WebmDemuxer() if fmt == "webm" else OggDemuxer())


def make_decoder(fmt: str) -> Decoder:
    """A fresh decoder for one stream; ValueError for a format not in FORMATS."""
    if fmt == "pcm":
        return PcmDecoder()
    if fmt == "auto":
        return AutoDecoder()
    if fmt in ("webm", "ogg"):
        return _container(fmt)
    raise ValueError(f"unknown audio format {fmt!r}; expected one of {', '.join(FORMATS)}")
