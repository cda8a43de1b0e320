"""Streaming Sortformer backend, on a tiny random-weight model built from the real module classes.

No Sortformer weights can be had offline, so these tests check the plumbing that a real checkpoint
relies on: chunking, feature alignment (against NeMo's own `forward_streaming` on the whole clip),
state carried across chunks and kept apart between streams, timing of the emitted frames.
"""
from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("nemo.collections.asr")

import torch  # noqa: E402

from backends.diarization_types import SpeakerTurn  # noqa: E402
from backends.sortformer import (  # noqa: E402
    FRAME_SECONDS, PRESETS, SAMPLE_RATE, SortformerDiarizer, SortformerLoadError, StreamingPreset,
    build_tiny_sortformer, load_sortformer,
)

# Small enough that 6 s of audio fills the FIFO, overflows the speaker cache and compresses it.
SMALL = StreamingPreset(chunk_len=6, chunk_right_context=7, fifo_len=20, spkcache_len=24, spkcache_update_period=12)
TEXT = "Good morning everyone. The meeting moved to Thursday afternoon, right after lunch, so bring the reports."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores shared with other work: OpenMP's spinning threads make tiny ops 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("needs espeak-ng and sox")
    wav = tmp_path_factory.mktemp("sortformer") / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), TEXT], check=True)
    pcm = subprocess.run(["sox", str(wav), "-t", "s16", "-r", str(SAMPLE_RATE), "-c", "1", "-"],
                         check=True, capture_output=True).stdout
    audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    assert 5 < len(audio) / SAMPLE_RATE < 9
    return audio


@pytest.fixture(scope="module")
def model():
    return build_tiny_sortformer("cpu", seed=0)


def stream(diarizer, audio, piece=512, state=None):
    """Feed `audio` in pieces of `piece` samples (or the given sizes), then flush."""
    state = state or diarizer.new_state()
    sizes = [piece] * math.ceil(len(audio) / piece) if isinstance(piece, int) else piece
    turns, at = [], 0
    for size in sizes:
        turns += diarizer.process(state, audio[at:at + size], np.zeros(size // 512, np.float32))
        at += size
    turns += diarizer.flush(state)
    return state, turns


def nemo_forward_streaming(model, audio):
    with torch.inference_mode():
        out = model.forward(audio_signal=torch.from_numpy(audio)[None].to(model.device),
                            audio_signal_length=torch.tensor([len(audio)], device=model.device))
    return out[0].float().cpu().numpy()


def test_presets():
    default = PRESETS["1s"]
    assert (default.chunk_len, default.chunk_right_context, default.fifo_len, default.spkcache_len,
            default.spkcache_update_period) == (6, 7, 188, 188, 144)
    assert {name: round(p.latency, 2) for name, p in PRESETS.items()} == \
        {"0.32s": 0.32, "1s": 1.04, "10s": 10.0, "30s": 30.4}


def test_preset_is_written_into_the_model(model):
    SortformerDiarizer(model, "0.32s")
    assert (model.sortformer_modules.chunk_len, model.sortformer_modules.chunk_right_context) == (3, 1)
    SortformerDiarizer(model)
    modules = model.sortformer_modules
    assert (modules.chunk_len, modules.chunk_left_context, modules.chunk_right_context, modules.fifo_len,
            modules.spkcache_len, modules.spkcache_update_period) == (6, 1, 7, 188, 188, 144)


def test_streaming_carries_state_across_chunks(model, speech):
    diarizer = SortformerDiarizer(model, SMALL)
    state = diarizer.new_state()
    duration = len(speech) / SAMPLE_RATE
    covered, frames, turns = [0.0], [0], []
    cache_sizes = []
    for at in range(0, len(speech), 2048):
        piece = speech[at:at + 2048]
        turns += diarizer.process(state, piece, np.zeros(len(piece) // 512, np.float32))
        covered.append(state.covered_until)
        frames.append(state.frames_emitted)
        cache_sizes.append(state.nemo_state.spkcache.shape[1])
        assert len(state.total_preds) == state.frames_emitted
        # Labelled as soon as the right context is in: never more than a chunk + the latency behind.
        received = state.received / SAMPLE_RATE
        assert received - SMALL.latency - SMALL.chunk_len * FRAME_SECONDS - 0.03 <= state.covered_until <= received
    turns += diarizer.flush(state)
    covered.append(state.covered_until)

    assert covered == sorted(covered) and state.covered_until == pytest.approx(duration)
    assert frames == sorted(frames) and len(set(frames)) > 8  # many chunks, emitted as they came
    assert abs(state.frames_emitted - math.ceil(duration / FRAME_SECONDS)) <= 1
    assert state.total_preds.shape == (state.frames_emitted, 4)
    # The speaker cache filled up, overflowed and was compressed back; the FIFO holds recent frames.
    assert cache_sizes[0] == 0 and max(cache_sizes) == SMALL.spkcache_len
    assert 0 < state.nemo_state.fifo.shape[1] <= SMALL.fifo_len
    assert state.nemo_state.spkcache_preds is not None
    # Only a few hops of raw audio are kept.
    assert len(state.audio) < (SMALL.chunk_left_context + SMALL.chunk_right_context + 2) * 8 * 160

    assert turns and all(isinstance(t, SpeakerTurn) for t in turns)
    assert all(0 <= t.start < t.end <= duration and 0 <= t.speaker < 4 for t in turns)
    # Turns are exactly the runs of frames above 0.5.
    active = np.zeros_like(state.total_preds, bool)
    for t in turns:
        active[round(t.start / FRAME_SECONDS):math.ceil(t.end / FRAME_SECONDS - 1e-9), t.speaker] = True
    assert np.array_equal(active, state.total_preds > 0.5)


@pytest.mark.parametrize("preset", ["1s", "0.32s", "10s", SMALL], ids=str)
def test_matches_nemo_forward_streaming_on_the_whole_clip(model, speech, preset):
    """NeMo computes features on the whole signal and then chunks them: same frames, same numbers."""
    diarizer = SortformerDiarizer(model, preset)
    state, _ = stream(diarizer, speech, piece=1536)
    reference = nemo_forward_streaming(model, speech)
    assert state.total_preds.shape == reference.shape
    np.testing.assert_allclose(state.total_preds, reference, atol=1e-5)


def test_piece_sizes_and_repeats_give_identical_output(model, speech):
    diarizer = SortformerDiarizer(model, SMALL)
    base_state, base_turns = stream(diarizer, speech, piece=512)
    rng = np.random.default_rng(1)
    odd = [*rng.integers(1, 6000, size=20).tolist(), len(speech)]  # odd sizes, then the rest
    key = lambda t: (t.start, t.speaker)  # noqa: E731
    for piece in (512, 4096, len(speech), odd):
        state, turns = stream(diarizer, speech, piece=piece)
        assert np.array_equal(state.total_preds, base_state.total_preds)
        assert sorted(turns, key=key) == sorted(base_turns, key=key)


def test_interleaved_streams_do_not_interfere(model, speech):
    diarizer = SortformerDiarizer(model, SMALL)
    other = np.concatenate([speech[::-1], np.zeros(SAMPLE_RATE // 2, np.float32)]) * 0.5
    alone_a, _ = stream(diarizer, speech, piece=1024)
    alone_b, _ = stream(diarizer, other, piece=1024)
    a, b = diarizer.new_state(), diarizer.new_state()
    for at in range(0, max(len(speech), len(other)), 1024):
        diarizer.process(a, speech[at:at + 1024], np.zeros(2, np.float32))
        diarizer.process(b, other[at:at + 1024], np.zeros(2, np.float32))
    diarizer.flush(a)
    diarizer.flush(b)
    assert np.array_equal(a.total_preds, alone_a.total_preds)
    assert np.array_equal(b.total_preds, alone_b.total_preds)


def test_flush_at_a_pause_then_continue(model, speech):
    diarizer = SortformerDiarizer(model, SMALL)
    state = diarizer.new_state()
    half = len(speech) // 2 + 100  # not on an 80-ms boundary
    turns = diarizer.process(state, speech[:half], None)
    turns += diarizer.flush(state)
    assert state.covered_until == pytest.approx(half / SAMPLE_RATE)
    assert state.frames_emitted == math.ceil(half // 160 / 8)  # NeMo's frame count: whole 10-ms hops
    assert diarizer.flush(state) == []  # nothing new
    turns += diarizer.process(state, speech[half:], None)
    turns += diarizer.flush(state)
    duration = len(speech) / SAMPLE_RATE
    assert state.covered_until == pytest.approx(duration)
    assert abs(state.frames_emitted - math.ceil(duration / FRAME_SECONDS)) <= 1
    assert all(0 <= t.start < t.end <= duration for t in turns)


def test_short_and_empty_streams(model):
    diarizer = SortformerDiarizer(model)
    state = diarizer.new_state()
    assert diarizer.process(state, np.zeros(0, np.float32), np.zeros(0, np.float32)) == []
    assert diarizer.flush(state) == [] and state.frames_emitted == 0
    diarizer.process(state, np.full(512, 0.01, np.float32), np.zeros(1, np.float32))
    diarizer.flush(state)
    assert state.frames_emitted == 1 and state.covered_until == pytest.approx(512 / SAMPLE_RATE)


def test_load_sortformer(model, speech, tmp_path):
    with pytest.raises(SortformerLoadError):
        load_sortformer(str(tmp_path / "missing.nemo"))
    path = tmp_path / "tiny.nemo"
    model.save_to(str(path))
    loaded = load_sortformer(str(path), "cpu")
    clip = speech[:2 * SAMPLE_RATE]
    expected, _ = stream(SortformerDiarizer(model, "1s"), clip)
    got, _ = stream(SortformerDiarizer(loaded, "1s"), clip)
    np.testing.assert_allclose(got.total_preds, expected.total_preds, atol=1e-6)


def test_async_streaming_mode_gives_the_same(model, speech):
    """Checkpoints may set `async_streaming` (fixed-size, length-masked cache and FIFO): same frames."""
    sync_state, _ = stream(SortformerDiarizer(model, SMALL), speech, piece=2048)
    model.async_streaming = True
    try:
        state, _ = stream(SortformerDiarizer(model, SMALL), speech, piece=2048)
        assert int(state.nemo_state.spkcache_lengths[0]) == SMALL.spkcache_len
    finally:
        model.async_streaming = False
    np.testing.assert_allclose(state.total_preds, sync_state.total_preds, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(speech):
    cuda_model = build_tiny_sortformer("cuda:0", seed=0)
    cpu_model = build_tiny_sortformer("cpu", seed=0)
    diarizer = SortformerDiarizer(cuda_model, SMALL)
    assert diarizer.device == torch.device("cuda:0")
    state, turns = stream(diarizer, speech, piece=2048)
    assert state.nemo_state.spkcache.device.type == "cuda"
    np.testing.assert_allclose(state.total_preds, nemo_forward_streaming(cuda_model, speech), atol=1e-4)
    cpu_state, _ = stream(SortformerDiarizer(cpu_model, SMALL), speech, piece=2048)
    np.testing.assert_allclose(state.total_preds, cpu_state.total_preds, atol=1e-3)
    duration = len(speech) / SAMPLE_RATE
    assert all(0 <= t.start < t.end <= duration for t in turns)
