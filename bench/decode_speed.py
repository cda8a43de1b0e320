"""How much CPU the in-process decoder spends per second of audio.

    python bench/decode_speed.py [FILE]   (default: espeak-ng speech encoded to webm/opus and ogg/opus)
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from streamserver.audio.decoders import SAMPLE_RATE, make_decoder  # noqa: E402


def decode_seconds(data: bytes, piece: int) -> tuple[float, int]:
    t = time.perf_counter()
    dec = make_decoder("auto")
    n = 0
    for i in range(0, len(data), piece):
        n += len(dec.feed(data[i:i + piece]))
    n += len(dec.flush())
    return time.perf_counter() - t, n


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    files = [Path(a) for a in sys.argv[1:]]
    if not files:
        wav = tmp / "s.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), "The quick brown fox jumps over the lazy dog. " * 3], check=True)
        for ext in ("webm", "ogg"):
            out = tmp / f"s.{ext}"
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(wav), "-c:a", "libopus", str(out)], check=True)
            files.append(out)
    for f in files:
        data = f.read_bytes()
        for piece in (500, 4000):
            best, n = min(decode_seconds(data, piece) for _ in range(5))
            print(f"{f.name}: {piece}-byte pieces: {1000 * best / (n / SAMPLE_RATE):.2f} ms per audio second")


if __name__ == "__main__":
    main()
