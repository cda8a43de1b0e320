"""Incremental demuxers for the containers browsers stream: WebM/Matroska and Ogg.

Why our own: MediaRecorder output arrives as an unbounded byte stream cut at
arbitrary points, and libavformat wants a seekable file or a blocking read
callback.  These demuxers only need ``feed(bytes) -> packets``; they buffer at
most one element header or one needed element (block, CodecPrivate) or one Ogg
page, skip everything else without buffering it, and fail fast with a byte
offset on anything malformed.  Decoding the packets is ``audio.py``'s job.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Protocol


class AudioDecodeError(Exception):
    """str(e) is the detail, e.g. 'invalid data at byte 0'."""


MAX_ELEMENT = 1 << 20  # biggest block / CodecPrivate / Ogg packet we agree to buffer


@dataclass(slots=True)
class Track:
    """The audio track: codec name for PyAV, its extradata, and the Opus pre-skip."""

    codec: str  # 'opus' | 'vorbis'
    extradata: bytes
    pre_skip: int = 0  # samples at the codec rate to drop from the start


@dataclass(slots=True)
class Packet:
    """One codec packet plus the end-trimming hints its container carried."""

    data: bytes
    offset: int  # stream offset of the block / page it came from (for errors)
    discard_ns: int = 0  # Matroska DiscardPadding: drop this much from the packet's end
    end_granule: int | None = None  # Ogg EOS granule: total samples after this packet


class Demuxer(Protocol):
    track: Track | None

    def feed(self, data: bytes) -> list[Packet]: ...

    def close(self) -> list[Packet]: ...


def _invalid(offset: int, why: str = "") -> AudioDecodeError:
    return AudioDecodeError(f"invalid data at byte {offset}" + (f" ({why})" if why else ""))


def opus_head(extradata: bytes, offset: int) -> Track:
    """Validate an OpusHead (RFC 7845 §5.1) and read its pre-skip."""
    if len(extradata) < 19 or extradata[:8] != b"OpusHead":
        raise _invalid(offset, "bad OpusHead")
    return Track("opus", extradata, int.from_bytes(extradata[10:12], "little"))


# ---------------------------------------------------------------- Matroska --
EBML, SEGMENT, CLUSTER, TRACKS, TRACK_ENTRY = 0x1A45DFA3, 0x18538067, 0x1F43B675, 0x1654AE6B, 0xAE
BLOCK_GROUP, SIMPLE_BLOCK, BLOCK, DISCARD_PADDING = 0xA0, 0xA3, 0xA1, 0x75A2
TRACK_NUMBER, TRACK_TYPE, CODEC_ID, CODEC_PRIVATE = 0xD7, 0x83, 0x86, 0x63A2
CONTENT_ENCODINGS, VOID, CRC32 = 0x6D80, 0xEC, 0xBF
_DESCEND = {SEGMENT, CLUSTER, BLOCK_GROUP, TRACKS, TRACK_ENTRY}
_READ = {SIMPLE_BLOCK, BLOCK, DISCARD_PADDING, TRACK_NUMBER, TRACK_TYPE, CODEC_ID, CODEC_PRIVATE,
         CONTENT_ENCODINGS}
# Legal children of the parents that may have unknown size (plus the root, 0):
# an ID outside the set ends the unknown-size parent (Matroska spec §6.2).
_CHILDREN = {
    0: {EBML, SEGMENT, VOID, CRC32},
    SEGMENT: {0x114D9B74, 0x1549A966, TRACKS, 0x1C53BB6B, 0x1941A469, 0x1043A770, 0x1254C367,
              CLUSTER, VOID, CRC32},
    CLUSTER: {0xE7, 0x5854, 0xA7, 0xAB, SIMPLE_BLOCK, BLOCK_GROUP, 0xAF, VOID, CRC32},
}
_MAGIC = {"webm": b"\x1a\x45\xdf\xa3", "ogg": b"OggS"}


@dataclass(slots=True)
class _Open:
    id: int
    end: float  # absolute end offset; inf for an unknown-size element under an unknown one
    unknown: bool


class WebmDemuxer:
    """Element walker: descends into the few masters we need, reads a few leaves."""

    def __init__(self) -> None:
        self.track: Track | None = None
        self._buf = bytearray()
        self._base = 0  # absolute offset of _buf[0]
        self._pos = 0  # parse position in _buf
        self._skip = 0  # bytes of a skipped element still to come
        self._stack: list[_Open] = []
        self._entry: dict[int, Any] = {}  # fields of the TrackEntry being read
        self._tracks: set[int] = set()
        self._audio_no = -1
        self._group: list[Packet] = []  # Block of the open BlockGroup
        self._discard = 0

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        out: list[Packet] = []
        self._parse(out)
        del self._buf[: self._pos]
        self._base += self._pos
        self._pos = 0
        return out

    def close(self) -> list[Packet]:
        """End of stream: emit a trailing BlockGroup's Block; a truncated rest is dropped."""
        if any(o.id == BLOCK_GROUP for o in self._stack) and self._group:
            self._group[-1].discard_ns = self._discard
            return self._group
        return []

    def _parse(self, out: list[Packet]) -> None:
        buf = self._buf
        while True:
            if self._skip:
                n = min(self._skip, len(buf) - self._pos)
                self._pos += n
                self._skip -= n
                if self._skip:
                    return
            at = self._base + self._pos
            while self._stack and at >= self._stack[-1].end:
                self._pop(out)
            if at == 0 and buf[:4] != _MAGIC["webm"][: len(buf)]:
                raise _invalid(0)
            head = self._header(at)
            if head is None:
                return
            eid, hlen, size = head
            self._close_unknown(eid, at, out)
            parent = self._stack[-1] if self._stack else None
            end = at + hlen + size if size is not None else (parent.end if parent else float("inf"))
            if parent and end > parent.end:
                raise _invalid(at, f"element 0x{eid:X} overruns its parent")
            if eid in _DESCEND:
                if size is None and eid not in (SEGMENT, CLUSTER):
                    raise _invalid(at, f"unknown size for element 0x{eid:X}")
                self._pos += hlen
                self._stack.append(_Open(eid, end, size is None))
                if eid == TRACK_ENTRY:
                    self._entry = {}
                elif eid == BLOCK_GROUP:
                    self._group, self._discard = [], 0
            elif size is None:
                raise _invalid(at, f"unknown size for element 0x{eid:X}")
            elif eid in _READ:
                if size > MAX_ELEMENT:
                    raise AudioDecodeError(f"element of {size} bytes too large at byte {at}")
                if len(buf) - self._pos < hlen + size:
                    return
                body = bytes(buf[self._pos + hlen : self._pos + hlen + size])
                self._pos += hlen + size
                self._leaf(eid, body, at, out)
            else:
                self._pos += hlen
                self._skip = size

    def _header(self, at: int) -> tuple[int, int, int | None] | None:
        """(id, header length, size or None if unknown), or None until more bytes come."""
        buf, p = self._buf, self._pos
        if p >= len(buf):
            return None
        ilen = 9 - buf[p].bit_length()
        if ilen > 4:
            raise _invalid(at, "bad element id")
        if len(buf) - p < ilen + 1:
            return None
        slen = 9 - buf[p + ilen].bit_length()
        if slen > 8:
            raise _invalid(at, "bad element size")
        if len(buf) - p < ilen + slen:
            return None
        eid = int.from_bytes(buf[p : p + ilen], "big")
        size = int.from_bytes(buf[p + ilen : p + ilen + slen], "big") & ((1 << (7 * slen)) - 1)
        return eid, ilen + slen, None if size == (1 << (7 * slen)) - 1 else size

    def _close_unknown(self, eid: int, at: int, out: list[Packet]) -> None:
        """An ID that can't be a child ends unknown-size parents; at the root it's garbage."""
        while True:
            top = self._stack[-1] if self._stack else None
            if top is not None and not top.unknown:
                return
            if eid in _CHILDREN[top.id if top else 0]:
                return
            if top is None:
                raise _invalid(at, f"unexpected element 0x{eid:X}")
            self._pop(out)

    def _pop(self, out: list[Packet]) -> None:
        done = self._stack.pop()
        if done.id == TRACK_ENTRY:
            self._end_track()
        elif done.id == TRACKS and self.track is None:
            raise AudioDecodeError("no audio track")
        elif done.id == BLOCK_GROUP and self._group:
            self._group[-1].discard_ns = self._discard
            out.extend(self._group)
            self._group = []

    def _end_track(self) -> None:
        e = self._entry
        number = int(e.get(TRACK_NUMBER, 0))
        self._tracks.add(number)
        if e.get(TRACK_TYPE) != 2 or self.track is not None:
            return
        codec = str(e.get(CODEC_ID, ""))
        private = bytes(e.get(CODEC_PRIVATE, b""))
        if CONTENT_ENCODINGS in e:
            raise AudioDecodeError("unsupported ContentEncoding on the audio track")
        if codec == "A_OPUS":
            self.track = opus_head(private, self._base + self._pos)
        elif codec == "A_VORBIS" and private:
            self.track = Track("vorbis", private)
        else:
            raise AudioDecodeError(f"unsupported codec {codec or '(none)'}")
        self._audio_no = number

    def _leaf(self, eid: int, body: bytes, at: int, out: list[Packet]) -> None:
        if eid in (SIMPLE_BLOCK, BLOCK):
            frames = self._block(body, at)
            packets = [Packet(f, at) for f in frames]
            (out if eid == SIMPLE_BLOCK else self._group).extend(packets)
        elif eid == DISCARD_PADDING:
            self._discard = int.from_bytes(body, "big", signed=True)
        elif eid == CODEC_ID:
            self._entry[eid] = body.rstrip(b"\0").decode("ascii", "replace")
        elif eid in (CODEC_PRIVATE, CONTENT_ENCODINGS):
            self._entry[eid] = body
        else:
            self._entry[eid] = int.from_bytes(body, "big")

    def _block(self, body: bytes, at: int) -> list[bytes]:
        """Split a (Simple)Block into frames for the audio track; [] for other tracks."""
        try:
            tlen = 9 - body[0].bit_length()
            track = int.from_bytes(body[:tlen], "big") & ((1 << (7 * tlen)) - 1)
            if track not in self._tracks:
                raise _invalid(at, f"block for unknown track {track}")
            if track != self._audio_no:
                return []
            lacing, p = (body[tlen + 2] >> 1) & 3, tlen + 3
            if lacing == 0:
                return [body[p:]]
            count, p = body[p] + 1, p + 1
            sizes: list[int] = []
            if lacing == 2:  # fixed-size
                if (len(body) - p) % count:
                    raise _invalid(at, "bad fixed lacing")
                sizes = [(len(body) - p) // count] * (count - 1)
            for i in range(count - 1 if lacing != 2 else 0):
                if lacing == 1:  # Xiph: sizes as runs of 255
                    n = 0
                    while body[p] == 255:
                        n, p = n + 255, p + 1
                    sizes.append(n + body[p])
                    p += 1
                else:  # EBML: first size as vint, then signed differences
                    vlen = 9 - body[p].bit_length()
                    v = int.from_bytes(body[p : p + vlen], "big") & ((1 << (7 * vlen)) - 1)
                    p += vlen
                    sizes.append(v if i == 0 else sizes[-1] + v - ((1 << (7 * vlen - 1)) - 1))
            sizes.append(len(body) - p - sum(sizes))
            if min(sizes) < 0:
                raise _invalid(at, "bad lacing")
            frames = []
            for n in sizes:
                frames.append(body[p : p + n])
                p += n
            return frames
        except IndexError:
            raise _invalid(at, "truncated block") from None


# --------------------------------------------------------------------- Ogg --
_OGG_CODECS = {b"\x7fFLAC": "flac", b"fLaC": "flac", b"Speex": "speex", b"\x80theora": "theora"}
_REV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def ogg_crc(page: bytes) -> int:
    """Ogg's CRC-32 (poly 0x04C11DB7, unreflected, init 0) via zlib on bit-reversed bytes."""
    r = zlib.crc32(page.translate(_REV), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int.from_bytes(r.to_bytes(4, "little").translate(_REV), "big")


class OggDemuxer:
    """Pages -> packets for the first logical stream (RFC 3533); checks capture and CRC."""

    def __init__(self) -> None:
        self.track: Track | None = None
        self._buf = bytearray()
        self._base = 0
        self._serial: int | None = None
        self._seq = -1
        self._partial = bytearray()
        self._headers: list[bytes] = []  # header packets seen so far

    def feed(self, data: bytes) -> list[Packet]:
        self._buf += data
        out: list[Packet] = []
        buf, p = self._buf, 0
        while True:
            at = self._base + p
            if buf[p : p + 4] != b"OggS"[: len(buf) - p]:
                raise _invalid(at, "missing OggS capture pattern" if at else "")
            if len(buf) - p < 27:
                break
            hlen = 27 + buf[p + 26]
            if len(buf) - p < hlen or len(buf) - p < hlen + sum(buf[p + 27 : p + hlen]):
                break
            lacing = bytes(buf[p + 27 : p + hlen])
            page = bytes(buf[p : p + hlen + sum(lacing)])
            p += len(page)
            self._page(page, lacing, hlen, at, out)
        del buf[:p]
        self._base += p
        return out

    def close(self) -> list[Packet]:
        return []  # a trailing partial page/packet is dropped: nothing decodable in it

    def _page(self, page: bytes, lacing: bytes, hlen: int, at: int, out: list[Packet]) -> None:
        if page[4] != 0:
            raise _invalid(at, "bad Ogg version")
        if ogg_crc(page[:22] + b"\0\0\0\0" + page[26:]) != int.from_bytes(page[22:26], "little"):
            raise AudioDecodeError(f"Ogg page checksum mismatch at byte {at}")
        flags, serial = page[5], int.from_bytes(page[14:18], "little")
        granule = int.from_bytes(page[6:14], "little", signed=True)
        if self._serial is None:
            if not flags & 2:
                raise _invalid(at, "Ogg stream does not begin with a BOS page")
            self._serial = serial
        if serial != self._serial:
            return  # another logical stream (e.g. a chained or multiplexed one): ignore
        seq = int.from_bytes(page[18:22], "little")
        if self._seq >= 0 and seq != self._seq + 1:
            raise AudioDecodeError(f"Ogg page missing before byte {at}")
        self._seq = seq
        if not flags & 1 and self._partial:
            raise _invalid(at, "Ogg packet continuation missing")
        packets: list[Packet] = []
        p = hlen
        for n in lacing:
            self._partial += page[p : p + n]
            p += n
            if len(self._partial) > MAX_ELEMENT:
                raise AudioDecodeError(f"Ogg packet too large at byte {at}")
            if n < 255:
                packets.append(Packet(bytes(self._partial), at))
                self._partial = bytearray()
        if packets and flags & 4:
            packets[-1].end_granule = granule
        for pk in packets:
            if self.track is None:
                self._header(pk)
            else:
                out.append(pk)

    def _header(self, pk: Packet) -> None:
        """Collect header packets: OpusHead + OpusTags, or the three Vorbis headers."""
        self._headers.append(pk.data)
        first = self._headers[0]
        if first.startswith(b"OpusHead"):
            if len(self._headers) == 2:
                self.track = opus_head(first, pk.offset)
        elif first.startswith(b"\x01vorbis"):
            if len(self._headers) == 3:  # extradata in Xiph lacing, as Matroska stores it
                lens = b"".join(b"\xff" * (len(h) // 255) + bytes([len(h) % 255])
                                for h in self._headers[:2])
                self.track = Track("vorbis", b"\x02" + lens + b"".join(self._headers))
        else:
            name = next((v for k, v in _OGG_CODECS.items() if first.startswith(k)), "unknown")
            raise AudioDecodeError(f"unsupported codec {name} in Ogg stream")
