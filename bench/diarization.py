"""DER (collar 0.25 s) and cost per audio second of each diarization backend on a generated conversation.

    python bench/diarization.py [--sortformer-model FILE.nemo] [--turns 8]

The conversation is two espeak-ng voices taking turns (tests/voices.py), streamed
through Silero VAD and the backend in 0.5-s pieces as the server does. The
Sortformer backend is measured only with a real checkpoint (none can be
downloaded here); its tiny random-weight test model would give a meaningless DER.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends.vad import SileroVAD  # noqa: E402
from bench.metrics import der  # noqa: E402
from tests.voices import CONVERSATION, make_conversation  # noqa: E402


def run(diarizer, audio: np.ndarray, piece: int = 8000) -> tuple[list, float]:
    vad = SileroVAD()
    vad_state, state = vad.new_state(), diarizer.new_state()
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
    return turns, spent + time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sortformer-model", default=None)
    ap.add_argument("--sortformer-tiny", action="store_true",
                    help="also run the tiny random-weight Sortformer: its cost is real, its DER is not")
    ap.add_argument("--turns", type=int, default=8, help="turns in the conversation (cycles the script)")
    args = ap.parse_args()
    script = [CONVERSATION[i % len(CONVERSATION)] for i in range(args.turns)]
    audio, truth = make_conversation(Path(tempfile.mkdtemp()), script)
    seconds = len(audio) / 16000
    backends = []
    from backends.embedding_diarizer import EmbeddingDiarizer

    backends.append(("embedding (resemblyzer)", EmbeddingDiarizer("cpu")))
    if args.sortformer_model:
        from backends.sortformer import SortformerDiarizer, load_sortformer

        backends.append(("sortformer", SortformerDiarizer(load_sortformer(args.sortformer_model, "cpu"), "1s")))
    if args.sortformer_tiny:
        from backends.sortformer import SortformerDiarizer, build_tiny_sortformer

        backends.append(("sortformer (tiny, random weights)", SortformerDiarizer(build_tiny_sortformer("cpu"), "1s")))
    print(f"conversation: {args.turns} turns, 2 voices, {seconds:.1f} s of audio")
    for name, diarizer in backends:
        run(diarizer, audio[: 16000 * 3])  # warm-up (lazy imports, first-call costs)
        turns, spent = run(diarizer, audio)
        scores = der(truth, [(t.start, t.end, t.speaker) for t in turns], collar=0.25)
        print(f"{name}: DER {scores['der']:.3f} (missed {scores['missed']:.3f}, false alarm "
              f"{scores['false_alarm']:.3f}, confusion {scores['confusion']:.3f}); speakers found "
              f"{len({t.speaker for t in turns})}; cost {1000 * spent / seconds:.1f} ms per audio second")


if __name__ == "__main__":
    main()
