"""Drive a diarizer as a live session does, checking what it promises about coverage."""
from __future__ import annotations

import numpy as np

from backends.vad import SileroVAD


def stream(diarizer, audio: np.ndarray, piece: int = 8000, whole: bool = False):
    """Audio in `piece`-sample steps with Silero's probabilities, then the flush: (turns, the coverage
    after each step). Every turn must lie inside the coverage the diarizer claimed when it gave the turn
    out; a stream diarized as a whole gives out nothing before the flush."""
    vad = SileroVAD()
    vad_state, state = vad.new_state(), diarizer.new_state(whole=whole)
    turns, covered, pending = [], [], np.zeros(0, np.float32)
    for i in range(0, len(audio), piece):
        pending = np.concatenate([pending, audio[i:i + piece]])
        probs = vad.probabilities(vad_state, audio[i:i + piece])
        n = len(probs) * 512
        new = diarizer.process(state, pending[:n], probs)
        pending = pending[n:]
        assert all(t.end <= state.covered_until + 1e-6 for t in new)  # only covered time is labelled
        assert not (whole and new)
        turns += new
        covered.append(state.covered_until)
    turns += diarizer.flush(state)
    covered.append(state.covered_until)
    return turns, covered
