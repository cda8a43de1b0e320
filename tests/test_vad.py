"""Tests for backends.vad: the shared Silero VAD and the per-stream segmenter.

Speech is made offline with espeak-ng + sox (1 s of silence either side).  The
reference is the package's own JIT model; importing ``silero_vad`` sets torch's
thread count to 1, so the fixture that imports it puts the old value back.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.vad import CONTEXT, SAMPLE_RATE, WINDOW, SileroVAD, SpeechEvent, SpeechSegmenter

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None, reason="needs espeak-ng and sox"
)

TEXT = "The quick brown fox jumps over the lazy dog. Streaming speech recognition needs voice activity detection."
PAD_S = 1.0
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """float32 16 kHz mono: 1 s silence, espeak speech, 1 s silence."""
    d = tmp_path_factory.mktemp("vad")
    raw, wav = d / "raw.wav", d / "speech16k.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(raw), TEXT], check=True)
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav), "pad", str(PAD_S), str(PAD_S)],
                   check=True)
    with wave.open(str(wav)) as w:
        assert w.getframerate() == SAMPLE_RATE
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    return SileroVAD("cpu")


@pytest.fixture(scope="module")
def jit_probs(speech: np.ndarray) -> np.ndarray:
    """The reference model's probabilities for each complete window of ``speech``."""
    threads = torch.get_num_threads()
    try:
        import silero_vad  # sets torch.set_num_threads(1) on first import

        model = silero_vad.load_silero_vad()
        n = len(speech) // WINDOW
        with torch.no_grad():
            return np.array([model(torch.from_numpy(speech[i * WINDOW:(i + 1) * WINDOW].copy()), SAMPLE_RATE).item()
                             for i in range(n)], np.float32)
    finally:
        torch.set_num_threads(threads)


def _windows(audio: np.ndarray) -> np.ndarray:
    n = len(audio) // WINDOW
    return audio[: n * WINDOW].reshape(n, WINDOW)


def _step_all(vad: SileroVAD, audio: np.ndarray) -> np.ndarray:
    state = vad.new_state()
    return np.array([vad.step([state], w[None])[0] for w in _windows(audio)], np.float32)


def _speech_bounds(audio: np.ndarray) -> tuple[int, int]:
    """First and last sample of audible speech, by amplitude."""
    loud = np.flatnonzero(np.abs(audio) > 0.02)
    return int(loud[0]), int(loud[-1])


# Probabilities agree up to float rounding, which depends on torch's thread count and on how the
# kernels split the work (earlier tests can leave either different); 1e-3 is far below any decision
# (speech starts at 0.5), yet a wrong state or window would differ by far more.
ROUNDING = 1e-3


def test_matches_reference_jit(vad: SileroVAD, speech: np.ndarray, jit_probs: np.ndarray) -> None:
    stepped = _step_all(vad, speech)
    assert stepped.shape == jit_probs.shape
    assert np.abs(stepped - jit_probs).max() < ROUNDING
    # probabilities() batches the encoder over time: same model up to float rounding.
    whole = vad.probabilities(vad.new_state(), speech)
    assert np.abs(whole - jit_probs).max() < ROUNDING
    # the clip really has speech and silence in it
    assert jit_probs.max() > 0.9 and jit_probs[:20].max() < 0.2


def test_batched_step_matches_separate_streams(vad: SileroVAD, speech: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    audios = [speech, speech[::-1].copy(), (0.05 * rng.standard_normal(len(speech))).astype(np.float32)]
    separate = [_step_all(vad, a) for a in audios]
    states = [vad.new_state() for _ in audios]
    wins = [_windows(a) for a in audios]
    batched = np.stack([vad.step(states, np.stack([w[t] for w in wins])) for t in range(len(wins[0]))], axis=1)
    for got, want in zip(batched, separate):
        assert np.abs(got - want).max() < ROUNDING
    assert np.abs(batched[0] - batched[1]).max() > 0.1  # the streams really differed
    # each state carries its own context: the last CONTEXT samples of its own audio
    for s, w in zip(states, wins):
        np.testing.assert_array_equal(s.context, w[-1, -CONTEXT:])


def test_probabilities_chunked_equals_whole(vad: SileroVAD, speech: np.ndarray) -> None:
    whole_state = vad.new_state()
    whole = vad.probabilities(whole_state, speech)
    assert len(whole) == len(speech) // WINDOW
    state, parts, pos = vad.new_state(), [], 0
    for size in [1, 137, 511, 3, 2048, 700, 0, 5000, 64, 9999] * 100:
        if pos >= len(speech):
            break
        parts.append(vad.probabilities(state, speech[pos:pos + size]))
        pos += size
    chunked = np.concatenate(parts)
    assert chunked.shape == whole.shape
    assert np.abs(chunked - whole).max() < ROUNDING
    np.testing.assert_array_equal(state.leftover, whole_state.leftover)
    assert len(state.leftover) == len(speech) % WINDOW


def test_segmenter_finds_the_utterance(vad: SileroVAD, speech: np.ndarray) -> None:
    probs = vad.probabilities(vad.new_state(), speech)
    seg = SpeechSegmenter()
    events = seg.push(probs)
    assert [e.kind for e in events] == ["start", "end"]
    onset, offset = _speech_bounds(speech)
    assert abs(events[0].sample - onset) < 0.2 * SAMPLE_RATE
    assert abs(events[1].sample - offset) < 0.3 * SAMPLE_RATE
    assert not seg.in_speech


def test_segmenter_silence_gives_nothing(vad: SileroVAD) -> None:
    probs = vad.probabilities(vad.new_state(), np.zeros(3 * SAMPLE_RATE, np.float32))
    seg = SpeechSegmenter()
    assert seg.push(probs) == [] and not seg.in_speech


def test_segmenter_chunking_invariant(vad: SileroVAD, speech: np.ndarray) -> None:
    probs = vad.probabilities(vad.new_state(), speech)
    probs = np.concatenate([probs, probs, probs])  # several utterances
    whole = SpeechSegmenter().push(probs)
    assert len(whole) == 6
    rng = np.random.default_rng(1)
    for _ in range(5):
        cuts = np.sort(rng.integers(0, len(probs), size=rng.integers(1, 40)))
        seg = SpeechSegmenter()
        events = [e for part in np.split(probs, cuts) for e in seg.push(part)]
        assert events == whole


def test_segmenter_semantics() -> None:
    """Hysteresis, minimum silence, pads and clamping, on hand-made probabilities."""
    seg = SpeechSegmenter(threshold=0.5, min_silence_ms=500, speech_pad_ms=100)
    pad, need = 1600, 16  # samples of pad; silent windows needed (16 * 512 >= 8000)
    assert seg.push(np.array([0.9])) == [SpeechEvent("start", 0)]  # clamped at 0
    assert seg.in_speech
    assert seg.push(np.full(50, 0.4)) == []  # between neg_threshold and threshold: still speech
    assert seg.push(np.full(need, 0.1)) == []  # not yet long enough
    assert seg.push(np.array([0.9])) == []  # speech again cancels the pending end
    first_silent = 1 + 50 + need + 1
    ev = seg.push(np.full(need + 1, 0.1))
    assert ev == [SpeechEvent("end", first_silent * WINDOW + pad)] and not seg.in_speech
    k = first_silent + need + 1 + 10
    assert seg.push(np.concatenate([np.full(10, 0.2), [0.7]])) == [SpeechEvent("start", k * WINDOW - pad)]


@pytest.mark.parametrize("seconds, windows", [(0.0, 1), (0.010, 1), (0.025, 1), (0.032, 1), (0.033, 2),
                                              (0.5, 16), (2.0, 63)])
def test_a_pause_is_heard_to_the_first_window_that_reaches_it(seconds: float, windows: int) -> None:
    """`set_pause`: speech ends once that much silence is heard, in whole 32-ms windows, one at the least
    (Deepgram's 10-ms endpointing ends at the first silent window)."""
    seg = SpeechSegmenter(threshold=0.5)
    seg.set_pause(seconds)
    seg.push(np.array([0.9]))
    assert seg.push(np.full(windows - 1, 0.1)) == []
    assert [e.kind for e in seg.push(np.array([0.1]))] == ["end"]


def test_module_does_not_import_silero_package() -> None:
    """Importing silero_vad would set torch threads to 1 for the whole process."""
    code = ("import sys, torch; torch.set_num_threads(2); from backends.vad import SileroVAD; SileroVAD(); "
            "assert 'silero_vad' not in sys.modules, 'silero_vad imported'; "
            "assert torch.get_num_threads() == 2, torch.get_num_threads()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_batch_of_streams_gets_what_each_gets_alone():
    """probabilities_batch over streams fed different amounts equals feeding each stream by itself."""
    from backends.vad import SileroVAD

    vad = SileroVAD()
    rng = np.random.default_rng(3)
    audios = [[(0.1 * rng.standard_normal(n)).astype(np.float32) for n in sizes]
              for sizes in ([700, 5000, 33], [5000, 0, 1600], [100, 100, 9000])]
    alone_states = [vad.new_state() for _ in audios]
    batch_states = [vad.new_state() for _ in audios]
    for k in range(3):
        alone = [vad.probabilities(s, a[k]) for s, a in zip(alone_states, audios)]
        together = vad.probabilities_batch(batch_states, [a[k] for a in audios])
        for x, y in zip(alone, together):
            np.testing.assert_allclose(x, y, atol=ROUNDING)
