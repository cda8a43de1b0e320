"""Streaming Sortformer diarization (NeMo's `SortformerEncLabelModel`), behind the diarization interface.

One model per device, shared by every stream; a stream's memory (Sortformer's speaker cache and FIFO,
the raw audio not yet turned into features, what has been emitted) lives in its `SortformerState`.

Sortformer labels 80-ms frames (8 mel frames of 10 ms) for up to 4 speakers. It runs on chunks of
`chunk_len` frames that also see `chunk_left_context` frames before and `chunk_right_context` after,
so a frame is final (chunk_len + chunk_right_context) * 80 ms after its audio arrived at worst: the
preset's latency. Frame k covers [k * 0.08, (k + 1) * 0.08) s of stream time.

Features: the mel spectrogram of a chunk is computed from the raw stream audio around it, starting a
few hops before the first mel frame it needs (whole hops, so the frame grid is the whole signal's) and
ending where the last needed frame's STFT window ends. A mel frame's value depends only on the
samples under its window (the preprocessor is pointwise after the STFT when `normalize` is "NA", as in
the streaming checkpoints), so every frame is exactly the frame NeMo computes on the whole signal;
`forward_streaming` on the whole clip and this class give the same probabilities. At `flush` the last
chunk takes what right context exists and the STFT's own zero padding ends the signal, the way
`forward_streaming` ends a file.

Written against nemo_toolkit 3.0.0. Names this file relies on, which moved between NeMo versions:
`SortformerEncLabelModel.forward_streaming_step(processed_signal, processed_signal_length,
streaming_state, total_preds, left_offset, right_offset)` (offsets in mel frames), the model attributes
`preprocessor`, `sortformer_modules`, `async_streaming`, `encoder.subsampling_factor`,
`SortformerModules.init_streaming_state(batch_size, async_streaming, device)` and its knobs
`chunk_len`, `chunk_left_context`, `chunk_right_context`, `fifo_len`, `spkcache_len`,
`spkcache_update_period` (not `spkcache_refresh_rate`, which some NeMo examples set to no effect), and
`preprocessor.featurizer.{n_fft, hop_length, stft_pad_amount, normalize, dither}`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .diarization_types import DiarizeJob, SpeakerTurn

if TYPE_CHECKING:
    from nemo.collections.asr.models import SortformerEncLabelModel

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FRAME_SECONDS = 0.08


@dataclass(frozen=True)
class StreamingPreset:
    """Sortformer's streaming knobs, in 80-ms frames."""

    chunk_len: int
    chunk_right_context: int
    fifo_len: int
    spkcache_len: int
    spkcache_update_period: int
    chunk_left_context: int = 1

    @property
    def latency(self) -> float:
        """Seconds between audio arriving and its frame being final (compute time aside)."""
        return (self.chunk_len + self.chunk_right_context) * FRAME_SECONDS


# The four operating points of the diar_streaming_sortformer_4spk-v2 / v2.1 model cards' latency table
# (as quoted by several projects built on them; the card itself could not be read offline). Named by
# latency, (chunk_len + chunk_right_context) * 80 ms. All keep NeMo's default chunk_left_context of 1.
PRESETS: dict[str, StreamingPreset] = {
    "0.32s": StreamingPreset(chunk_len=3, chunk_right_context=1, fifo_len=188, spkcache_len=188,
                             spkcache_update_period=144),
    "1s": StreamingPreset(chunk_len=6, chunk_right_context=7, fifo_len=188, spkcache_len=188,
                          spkcache_update_period=144),  # 1.04 s
    "10s": StreamingPreset(chunk_len=124, chunk_right_context=1, fifo_len=124, spkcache_len=188,
                           spkcache_update_period=124),
    "30s": StreamingPreset(chunk_len=340, chunk_right_context=40, fifo_len=40, spkcache_len=188,
                           spkcache_update_period=300),  # 30.4 s
}


class SortformerLoadError(RuntimeError):
    """The checkpoint could not be restored (missing file, no network for a model name, bad archive)."""


def load_sortformer(path_or_name: str, device: str | torch.device = "cpu") -> SortformerEncLabelModel:
    """A `.nemo` file (or any existing path) is restored; anything else is a NeMo/HF model name."""
    from pathlib import Path

    from nemo.collections.asr.models import SortformerEncLabelModel

    device = torch.device(device)
    try:
        if path_or_name.endswith(".nemo") or Path(path_or_name).exists():
            model = SortformerEncLabelModel.restore_from(path_or_name, map_location=device)
        else:
            model = SortformerEncLabelModel.from_pretrained(path_or_name, map_location=device)
    except Exception as exc:  # NeMo raises anything from FileNotFoundError to HTTP errors
        raise SortformerLoadError(f"cannot load Sortformer model {path_or_name!r}: {exc}") from exc
    return model.to(device).eval()


def build_tiny_sortformer(device: str | torch.device = "cpu", seed: int = 0) -> SortformerEncLabelModel:
    """Random weights, the real model's module classes and preprocessor, a few thousand parameters.

    Mirrors NeMo's `streaming_sortformer_diarizer_4spk-v2.yaml` (17 FastConformer layers of 512, 18
    Transformer layers of 192) scaled down; `normalize: NA` as in the released streaming checkpoints.
    """
    from omegaconf import OmegaConf

    from nemo.collections.asr.models import SortformerEncLabelModel

    fc, tf = 32, 16
    cfg = OmegaConf.create({
        "sample_rate": SAMPLE_RATE, "pil_weight": 0.5, "ats_weight": 0.5, "max_num_of_spks": 4,
        "streaming_mode": True, "train_ds": None, "validation_ds": None, "test_ds": None,
        "model_defaults": {"fc_d_model": fc, "tf_d_model": tf},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "normalize": "NA", "window_size": 0.025, "sample_rate": SAMPLE_RATE, "window_stride": 0.01,
            "window": "hann", "features": 128, "n_fft": 512, "frame_splicing": 1, "dither": 1e-5},
        "sortformer_modules": {
            "_target_": "nemo.collections.asr.modules.sortformer_modules.SortformerModules",
            "num_spks": 4, "dropout_rate": 0.5, "fc_d_model": fc, "tf_d_model": tf},
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 128, "feat_out": -1,
            "n_layers": 2, "d_model": fc, "subsampling": "dw_striding", "subsampling_factor": 8,
            "subsampling_conv_channels": 16, "ff_expansion_factor": 2, "self_attention_model": "rel_pos",
            "n_heads": 2, "att_context_size": [-1, -1], "conv_kernel_size": 9, "conv_norm_type": "batch_norm",
            "dropout": 0.1, "dropout_pre_encoder": 0.1, "dropout_emb": 0.0, "dropout_att": 0.1},
        "transformer_encoder": {
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": 2, "hidden_size": tf, "inner_size": 2 * tf, "num_attention_heads": 2,
            "attn_score_dropout": 0.5, "attn_layer_dropout": 0.5, "ffn_dropout": 0.5, "hidden_act": "relu",
            "pre_ln": False, "pre_ln_final_layer_norm": True},
        "loss": {"_target_": "nemo.collections.asr.losses.bce_loss.BCELoss", "weight": None, "reduction": "mean"},
    })
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SortformerEncLabelModel(cfg=cfg)
    return model.to(torch.device(device)).eval()


@dataclass
class SortformerState:
    """One stream. Sample and frame counts are absolute (from the start of the stream)."""

    nemo_state: Any  # NeMo's StreamingSortformerState: speaker cache, FIFO, silence profile
    preds: list[np.ndarray] = field(default_factory=list)  # (frames, speakers) per step, on the CPU
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # samples from audio_start on
    audio_start: int = 0
    received: int = 0  # samples received
    frames_emitted: int = 0  # 80-ms frames labelled; the next chunk starts here
    covered_until: float = 0.0

    @property
    def total_preds(self) -> np.ndarray:
        """Every emitted frame's speaker probabilities, (frames_emitted, speakers)."""
        return np.concatenate(self.preds) if self.preds else np.zeros((0, 0), np.float32)


class SortformerDiarizer:
    """Streaming diarization with a Sortformer model; holds no per-stream state.

    The preset is written into the model's `sortformer_modules` (that is where NeMo reads it during
    every step), so all diarizers sharing one model must share one preset.
    """

    def __init__(self, model: SortformerEncLabelModel, preset: str | StreamingPreset = "1s",
                 threshold: float = 0.5) -> None:
        self.model = model.eval()
        self.preset = PRESETS[preset] if isinstance(preset, str) else preset
        self.threshold = threshold
        modules = model.sortformer_modules
        for name in ("chunk_len", "chunk_left_context", "chunk_right_context", "fifo_len", "spkcache_len",
                     "spkcache_update_period"):
            setattr(modules, name, getattr(self.preset, name))
        modules._check_streaming_parameters()
        featurizer = model.preprocessor.featurizer
        featurizer.dither = 0.0  # NeMo 3.0.0 dithers only in training; be sure for older checkpoints
        if featurizer.normalize not in (None, "", "NA", False):
            log.warning("Sortformer preprocessor normalizes %r over the whole input: streamed features "
                        "will differ from offline ones", featurizer.normalize)
        self._sub = int(model.encoder.subsampling_factor)  # mel frames per output frame (8)
        self._hop = int(featurizer.hop_length)  # 160 samples
        self._n_fft = int(featurizer.n_fft)
        # Mel frame j's STFT window covers samples [j*hop - pad, j*hop - pad + n_fft).
        self._pad = featurizer.stft_pad_amount if featurizer.stft_pad_amount is not None else self._n_fft // 2
        if self._pad < self._hop:
            raise ValueError("STFT padding under one hop: cannot window features without a seam")
        self._margin = math.ceil(self._pad / self._hop) + 1  # mel frames computed before and dropped

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def new_state(self) -> SortformerState:
        nemo_state = self.model.sortformer_modules.init_streaming_state(
            batch_size=1, async_streaming=self.model.async_streaming, device=self.device)
        return SortformerState(nemo_state=nemo_state)

    def process(self, state: SortformerState, audio: np.ndarray,
                vad_probs: np.ndarray | None = None) -> list[SpeakerTurn]:
        """Take in audio; label every chunk whose right context has arrived. `vad_probs` is unused:
        Sortformer detects speech itself."""
        audio = np.asarray(audio, np.float32)
        state.audio = np.concatenate([state.audio, audio])
        state.received += len(audio)
        first, steps = state.frames_emitted, len(state.preds)
        while (chunk := self._next_chunk(state, final=False)) is not None:
            self._run_chunk(state, *chunk)
        state.covered_until = max(state.covered_until,
                                  min(state.frames_emitted * FRAME_SECONDS, state.received / SAMPLE_RATE))
        return self._turns(state, first, state.preds[steps:])

    def flush(self, state: SortformerState) -> list[SpeakerTurn]:
        """End of stream (or a pause): label everything received, the last chunk with the right context
        that exists. Audio given to `process` afterwards continues the stream at the next 80-ms frame."""
        first, steps = state.frames_emitted, len(state.preds)
        while (chunk := self._next_chunk(state, final=True)) is not None:
            self._run_chunk(state, *chunk)
        state.covered_until = max(state.covered_until, state.received / SAMPLE_RATE)
        return self._turns(state, first, state.preds[steps:])

    def process_batch(self, jobs: list[DiarizeJob]) -> list[list[SpeakerTurn]]:
        """The scheduler's round of streams, one after another: each stream's NeMo streaming state
        (speaker cache, FIFO) is its own, and NeMo steps one state at a time."""
        return [self.flush(j.state) if j.flush else self.process(j.state, j.audio, j.vad_probs) for j in jobs]

    # -- internals --------------------------------------------------------
    def _next_chunk(self, state: SortformerState, final: bool) -> tuple[int, int, int, int] | None:
        """(left, start, end, right) in mel frames for the next chunk, or None if it must wait."""
        p, sub = self.preset, self._sub
        start = state.frames_emitted * sub
        if final:  # the whole-signal frame count NeMo's preprocessor gives for `received` samples
            total = (state.received + 2 * self._pad - self._n_fft) // self._hop
            if start >= total:
                return None
            end = min(start + p.chunk_len * sub, total)
            right = min(p.chunk_right_context * sub, total - end)
        else:  # frames whose STFT window lies wholly in the audio received
            final_frames = (state.received + self._pad - self._n_fft) // self._hop + 1
            end = start + p.chunk_len * sub
            right = p.chunk_right_context * sub
            if end + right > final_frames:
                return None
        return min(p.chunk_left_context * sub, start), start, end, right

    def _features(self, state: SortformerState, first: int, stop: int) -> torch.Tensor:
        """Mel frames [first, stop) of the stream, (1, frames, features), equal to whole-signal ones."""
        w0 = max(0, (first - self._margin) * self._hop)  # whole hops: window frame i = stream frame w0/hop + i
        w1 = min(state.received, (stop - 1) * self._hop - self._pad + self._n_fft)
        window = torch.from_numpy(state.audio[w0 - state.audio_start:w1 - state.audio_start]).to(self.device)
        feats, length = self.model.preprocessor(input_signal=window.unsqueeze(0),
                                                length=torch.tensor([w1 - w0], device=self.device))
        a, b = first - w0 // self._hop, stop - w0 // self._hop
        assert b <= int(length[0]), "feature window too short"
        return feats[:, :, a:b].transpose(1, 2)

    @torch.inference_mode()
    def _run_chunk(self, state: SortformerState, left: int, start: int, end: int, right: int) -> None:
        chunk = self._features(state, start - left, end + right)
        model = self.model
        empty = torch.zeros((1, 0, model.sortformer_modules.n_spk), device=self.device)
        state.nemo_state, preds = model.forward_streaming_step(
            processed_signal=chunk, processed_signal_length=torch.tensor([chunk.shape[1]], device=self.device),
            streaming_state=state.nemo_state, total_preds=empty, left_offset=left, right_offset=right)
        frames = preds[0].float().cpu().numpy()
        assert len(frames) == math.ceil((end - start) / self._sub), "Sortformer returned an unexpected frame count"
        state.preds.append(frames)
        state.frames_emitted += len(frames)
        # Keep the audio from where the next chunk's feature window (left context included) starts.
        next_first = state.frames_emitted * self._sub - self.preset.chunk_left_context * self._sub
        keep = max(0, (next_first - self._margin) * self._hop)
        keep = min(max(keep, state.audio_start), state.received)
        state.audio = state.audio[keep - state.audio_start:]
        state.audio_start = keep

    def _turns(self, state: SortformerState, first_frame: int, new: list[np.ndarray]) -> list[SpeakerTurn]:
        """Per step and speaker, the runs of frames above threshold. Runs are not merged across steps, so
        turns depend on the audio only, not on how it was cut into `process` calls; a speaker who goes on
        gets adjacent turns, one per chunk."""
        end_of_audio = state.received / SAMPLE_RATE
        turns = []
        for probs in new:
            for speaker in range(probs.shape[1]):
                active = np.concatenate([[False], probs[:, speaker] > self.threshold, [False]])
                edges = np.flatnonzero(active[1:] != active[:-1])
                for a, b in zip(edges[::2], edges[1::2]):
                    start = round((first_frame + int(a)) * FRAME_SECONDS, 6)
                    end = min(round((first_frame + int(b)) * FRAME_SECONDS, 6), end_of_audio)
                    if end > start:
                        turns.append(SpeakerTurn(start, end, speaker))
            first_frame += len(probs)
        return sorted(turns, key=lambda t: (t.start, t.speaker))
