"""The real-speech set (`../shared/speech` by default) and how its transcripts are scored.

Every accuracy or capacity figure is measured on these recordings: each clip's
reference is the text its source repository gives. Both sides are normalised
with openai-whisper's `EnglishTextNormalizer` before WER, so "ten meters" and
"10 meters", fillers and bracketed events do not count. CHAT markup (the CHILDES
clip) is stripped from the reference first.

The failure counters are the ones a caption reader notices, measured on the
committed words a client saw:
- a run of 3+ words repeated back to back where the reference has no such repeat;
- committed words whose times go backwards;
- words of the reference's end with nothing said for them after the end of stream;
- committed `lines` text that changed in a later update (the contract forbids it).
"""
from __future__ import annotations

import csv
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.metrics import edit_distance, reference_heard

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SET = ROOT.parent / "shared" / "speech"
SAMPLE_RATE = 16000

_CHAT_SPEAKER = re.compile(r"\*[A-Z]{3}:")
_CHAT_CODES = [
    re.compile(r"&-\w+"),  # fillers coded as &-uh
    re.compile(r"\[[<>]\]"),  # overlap markers
    re.compile(r"\+[/.,!?\"]+"),  # utterance linkers and terminators: +/. +,
    re.compile(r"\(\.+\)"),  # pauses (.)
    re.compile(r"@s:\w+"),  # language switch suffix
    re.compile(r"[<>]"),  # scope brackets
]


@dataclass(frozen=True)
class Clip:
    name: str
    path: Path
    seconds: float
    kind: str
    reference: str  # cleaned, ready for the normaliser ("" for a clip with speaker turns only)
    speakers: int = 1  # people speaking, from the manifest
    rttm: Path | None = None  # reference speaker turns, when the set has them

    def turns(self) -> list[tuple[float, float, str]]:
        """The reference speaker turns: (start, end, speaker) from the RTTM beside the WAV."""
        out = []
        for line in self.rttm.read_text().splitlines() if self.rttm else []:
            f = line.split()
            if f and f[0] == "SPEAKER":
                out.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
        return sorted(out)

    def pcm16(self) -> bytes:
        with wave.open(str(self.path)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2), self.path
            return w.readframes(w.getnframes())

    def audio(self) -> np.ndarray:
        return np.frombuffer(self.pcm16(), dtype="<i2").astype(np.float32) / 32768.0


def clean_reference(text: str) -> str:
    """The source's transcript without CHAT speaker codes and markup (other text is kept as is)."""
    if _CHAT_SPEAKER.search(text):
        text = _CHAT_SPEAKER.sub(" ", text)
        for pattern in _CHAT_CODES:
            text = pattern.sub(" ", text)
        text = text.replace(":", "")  # lengthened sounds: hm:
    return " ".join(text.split())


def load_clips(folder: Path = DEFAULT_SET, names: list[str] | None = None) -> list[Clip]:
    """Clips of the set that have a reference transcript (speaker-turn-only clips are skipped)."""
    return [c for c in _manifest(folder, names) if c.reference]


def load_diarized(folder: Path = DEFAULT_SET, names: list[str] | None = None) -> list[Clip]:
    """Clips of the set that have reference speaker turns (an RTTM beside the WAV)."""
    return [c for c in _manifest(folder, names) if c.rttm is not None]


def _manifest(folder: Path, names: list[str] | None) -> list[Clip]:
    clips = []
    with open(Path(folder) / "manifest.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            name = row["file"].removesuffix(".wav")
            if names and name not in names:
                continue
            text = row["transcript"].strip()
            rttm = Path(folder) / f"{name}.rttm"
            clips.append(Clip(name, Path(folder) / row["file"], float(row["seconds"]), row["kind"],
                              "" if text in ("", "none") else clean_reference(text),
                              int(row.get("speakers") or 1), rttm if rttm.exists() else None))
    return clips


_normaliser = None


def normalised_words(text: str) -> list[str]:
    global _normaliser
    if _normaliser is None:
        from whisper.normalizers import EnglishTextNormalizer

        _normaliser = EnglishTextNormalizer()
    return _normaliser(text).split()


def edit_counts(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words) after normalising both sides: pooled WER is sum/sum."""
    ref = normalised_words(reference)
    return edit_distance(ref, normalised_words(hypothesis)), len(ref)


def pooled_wer(pairs) -> float:
    """Pooled WER of (reference, hypothesis) pairs: all word edits over all reference words."""
    counts = [edit_counts(reference, hypothesis) for reference, hypothesis in pairs]
    return sum(e for e, _ in counts) / max(sum(n for _, n in counts), 1)


def wer(reference: str, hypothesis: str) -> float:
    edits, n = edit_counts(reference, hypothesis)
    return edits / max(n, 1)


def repeated_runs(words: list[str], min_run: int = 3) -> int:
    """How many places a run of `min_run`+ words is immediately repeated ("a b c a b c")."""
    count, i = 0, 0
    while i < len(words):
        found = 0
        for n in range(min_run, (len(words) - i) // 2 + 1):
            if words[i:i + n] == words[i + n:i + 2 * n]:
                found = n
                break
        if found:
            count += 1
            i += 2 * found
        else:
            i += 1
    return count


def new_repeats(reference: str, hypothesis: str) -> int:
    """Repeated runs in the hypothesis beyond those the reference itself has."""
    return max(0, repeated_runs(normalised_words(hypothesis)) - repeated_runs(normalised_words(reference)))


def lost_ending(reference: str, hypothesis: str, tail: int = 3) -> bool:
    """Most of the reference's last `tail` words have nothing said for them in the hypothesis.

    The two are aligned word by word (minimum edits); a reference word is lost when the alignment
    deletes it. A transcript that stops a sentence early loses its ending; one that ends in a
    misrecognised word ("a liner" for "aligner") has it, wrong, which WER already counts."""
    ref, hyp = normalised_words(reference), normalised_words(hypothesis)
    if not ref:
        return False
    heard = reference_heard(ref, hyp)[-tail:]
    return sum(heard) < max(1, len(heard) - 1)


@dataclass
class LinesCheck:
    """What a client saw of the committed lines over one stream's updates."""

    changed: int = 0  # updates in which committed text already shown changed
    backwards: int = 0  # committed lines starting before the line before them, or an end moving back
    last_text: list[str] | None = None
    last_end: float = 0.0
    first_change: tuple[list[str], list[str]] | None = None  # (lines before, lines after), to show it

    def update(self, lines: list[dict]) -> None:
        spoken = [ln for ln in lines if ln.get("speaker") != -2 and ln.get("text", "").strip()]
        texts = [ln["text"] for ln in spoken]
        old = self.last_text
        if old is not None and (len(texts) < len(old) or texts[:len(old) - 1] != old[:-1]
                                or (old and not texts[len(old) - 1].startswith(old[-1]))):
            self.changed += 1
            self.first_change = self.first_change or (old, texts)
        self.last_text = texts
        end = max((float(ln.get("end_s", 0.0)) for ln in spoken), default=0.0)
        if end < self.last_end - 0.05:
            self.backwards += 1
        self.last_end = max(self.last_end, end)

    def finish(self, lines: list[dict]) -> None:
        """The final lines: each committed line starts no earlier than the one before it."""
        self.update(lines)
        starts = [float(ln.get("start_s", 0.0)) for ln in lines
                  if ln.get("speaker") != -2 and ln.get("text", "").strip()]
        self.backwards += sum(1 for a, b in zip(starts, starts[1:]) if b < a - 0.05)
