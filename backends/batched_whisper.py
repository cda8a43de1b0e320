"""Whisper for many streams at once: one encoder pass and one greedy decoding loop per batch.

openai-whisper decodes one audio window at a time through forward hooks that
`torch.cat` a growing key/value cache, and pads every window to 30 s. Here the
same weights run through our own forward:

- the encoder takes only as much audio as a stream has buffered, rounded up to
  a bucket (`bucket_seconds`), so a stream's result never depends on which
  other streams share its batch; streams of one bucket are encoded together;
- the decoder runs all streams of the batch in one loop with a key/value cache
  preallocated once per batch, left-padded prompts, and cross-attention masked
  to each stream's own audio frames;
- word times come from the cross-attention of the alignment heads captured
  while decoding (the DTW of openai-whisper's `find_alignment`, without its
  second forward pass).

Batched and one-at-a-time decoding give the same transcript (tested).
"""
from __future__ import annotations

import logging
import math
import string
import time
import zlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.audio import HOP_LENGTH, N_FFT, SAMPLE_RATE, mel_filters
from whisper.timing import dtw
from whisper.tokenizer import Tokenizer, get_tokenizer

from . import final_search
from .asr_types import CLAUSE_END, SENTENCE_END, Segment, TranscribeJob, Word, without_repeats
from .decoder_step import (DecoderStep, StepBuffers, VocabularyProjection, int8_supported, merge_heads, most_attended, pick,
                           split_heads, timestamp_rules)
from .draft import Draft

log = logging.getLogger("backends.batched_whisper")

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # mel frames
TOKENS_PER_SECOND = FRAMES_PER_SECOND // 2  # encoder positions
# openai-whisper's `transcribe` guards: a decode whose text compresses better than this (gzip) or
# whose mean token log-probability is below that is degenerate (a loop, a guess) and is decoded
# again at the next temperature; a window whose no-speech probability is over NO_SPEECH_LIMIT and
# whose decode is that unsure is silence.
TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
COMPRESSION_RATIO_LIMIT = 2.4
LOGPROB_LIMIT = -1.0
NO_SPEECH_LIMIT = 0.6
ENCODE_BATCH = 32  # windows per encoder call: enough to fill a GPU, and the activations stay bounded
MIN_SILENCE_AFTER = 1.0  # seconds of padding every window keeps after its audio (Whisper ends text on silence)
# The shortest window when windows are bucketed (`bucket_seconds`). The encoder's cost grows with the
# window (30 s: 0.4 CPU-s on 2 cores, 15 s: under half of that), and a live buffer is mostly 2-12 s.
# But Whisper was trained on 30-s windows, and the shorter the window, the further from them: over the
# real-speech set, 10-s windows cost the two-person recordings words (a child's father, a 1.6-s
# sentence said twice) where 15-s windows kept the pooled WER of 30-s ones (`bench/accuracy.py`,
# live LocalAgreement, tiny.en: 14.3-14.9 % against 15.1 %) at 0.47 CPU-s per audio second against
# 0.69 (`bench/stream_cost.py`, one stream).
MIN_WINDOW_SECONDS = 15.0
# AlignAtt decoding: a token whose attention jumps back this far before the previous token's (or, for
# the first, before the end of the forced prefix) is not transcribing new speech but inventing text
# ("In terms of graph that" over a pause, every token attending to one early frame). The row ends
# there. SimulStreaming's rewind threshold (200 encoder positions).
REWIND_SECONDS = 4.0
# A window's token budget: this many per second of its audio, and TOKENS_FOR_ANY_WINDOW more (the
# timestamps, a word cut at the window's edge), up to openai-whisper's half of the text context. Real
# speech runs 3-7 tokens a second (the fastest reference of ../shared/speech: 7.3, all capitals), so
# a row that fills it is a loop or a sampled ramble. Without it, a fallback decode at a high
# temperature of a 1-s "Ha ha ha." ran to 224 tokens: 3.6 s of CPU, every stream of the device
# waiting, and its words 6 s late in a soak.
MAX_TOKENS_PER_SECOND = 12.0
TOKENS_FOR_ANY_WINDOW = 16
# The most drafted tokens one decoder pass checks (`backends/draft.py`). A pass costs more the more
# it checks, and a draft's tail (the words at the edge of the last decode's audio) is the likeliest
# to be said differently.
MAX_DRAFT_TOKENS = 24


@dataclass
class _Row:
    """One job inside a batch while it decodes."""

    job: TranscribeJob
    tokenizer: Tokenizer
    context: list[int]  # forced tokens: [sot_prev, prompt...,] sot, [lang, task,] no_timestamps
    max_new: int
    window: int  # encoder positions of this job's bucket (what its decoder attends to)
    frames: int  # encoder positions that hold this job's audio (what word times map onto)
    tokens: list[int]
    temperature: float = 0.0
    timestamps: bool = True  # decode with timestamp tokens, as openai-whisper's `transcribe` does
    sot_index: int = 0  # where the start-of-transcript token sits in `context` (its logits give no-speech)
    done: bool = False
    sum_logprob: float = 0.0  # log-probabilities of the tokens taken, and of the end of text
    no_speech: float = 0.0
    stop_at: int | None = None  # AlignAtt: a token attending at or past this position ends the row
    last_heard: int = 0  # AlignAtt: the position the previous token attended to (the prefix's end at first)
    heard: list[int] = field(default_factory=list)  # per accepted token, the position it attended to
    budget_per_second: bool = False  # `max_new` comes from the audio's length (`MAX_TOKENS_PER_SECOND`)
    overran: bool = False  # the row ended at such a budget, not at end of text
    draft: Draft | None = None  # what a decode of this audio said a moment ago (greedy rows only)

    @property
    def text_tokens(self) -> list[int]:
        return [t for t in self.tokens if t < self.tokenizer.eot]

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / (len(self.tokens) + 1)

    @cached_property  # read only once the row is decoded, by the fallback check and by `_segments`
    def compression_ratio(self) -> float:
        text = self.tokenizer.decode(self.text_tokens).encode("utf-8")
        return len(text) / len(zlib.compress(text)) if text else 0.0

    @property
    def silent(self) -> bool:
        """openai-whisper's rule: probably no speech, and nothing decoded with confidence."""
        return self.no_speech > NO_SPEECH_LIMIT and self.avg_logprob < LOGPROB_LIMIT

    @property
    def degenerate(self) -> bool:
        return (self.overran or self.compression_ratio > COMPRESSION_RATIO_LIMIT
                or self.avg_logprob < LOGPROB_LIMIT)


class BatchedWhisper:
    """One loaded Whisper on one device, shared by all of its streams; keeps no per-stream state.

    `transcribe_batch` is the scheduler's entry; `transcribe` is a batch of one.
    """

    def __init__(
        self,
        model: whisper.model.Whisper,
        language: str | None = None,
        name: str = "",
        bucket_seconds: float = 0.0,
        min_window_seconds: float = MIN_WINDOW_SECONDS,
        max_tokens_per_second: float | None = MAX_TOKENS_PER_SECOND,
        fp16: bool | None = None,
        max_batch: int = 32,
        cuda_graphs: bool | None = None,
        encoder_bf16: bool | None = None,
        int8_vocabulary: bool | None = None,
        beam_size: int = 1,
        searches_per_round: int = 2,
    ) -> None:
        self.fp16 = model.device.type == "cuda" if fp16 is None else fp16
        self.model = _half(model) if self.fp16 else model
        self.model.eval()
        self.name = name
        self.language = None if language in (None, "auto") else language
        self.bucket_seconds = bucket_seconds
        self.min_window_seconds = min_window_seconds
        # None: openai-whisper's budget alone, half the text context (224 tokens) per window,
        # whatever the audio's length.
        self.max_tokens_per_second = max_tokens_per_second
        self.temperatures: tuple[float, ...] = TEMPERATURES
        # A job's last decode (`TranscribeJob.final`) searches this many hypotheses (`final_search`);
        # 1: greedy like every other decode.
        self.beam_size = beam_size
        self.searches_per_round = searches_per_round
        dims = model.dims
        self.dims = dims
        self.dtype = torch.float16 if self.fp16 else torch.float32
        # On a CPU with bf16 matrix units the encoder runs in bfloat16 (about twice as fast, the same
        # words on our tests); the decoder stays in float32, where small bf16 products are no faster.
        self.encoder_dtype = self.dtype
        if encoder_bf16 if encoder_bf16 is not None else (not self.fp16 and _cpu_has_bf16(self.device)):
            _to_dtype(self.model.encoder, torch.bfloat16)
            self.encoder_dtype = torch.bfloat16
        embedding = self.model.decoder.token_embedding.weight.to(self.dtype)
        quantized = int8_supported(self.device) if int8_vocabulary is None else int8_vocabulary
        self._vocabulary = VocabularyProjection(
            embedding, embedding.T.contiguous() if self.device.type == "cpu" and not quantized else None, quantized)
        self._filters = mel_filters(model.device, dims.n_mels)
        self._window = torch.hann_window(N_FFT, device=model.device)
        heads = model.alignment_heads.to_dense() if model.alignment_heads.is_sparse else model.alignment_heads
        self._align = [(int(l), int(h)) for l, h in heads.nonzero().tolist()]
        self._align_layers = sorted({l for l, _ in self._align})
        self._tokenizers: dict[str | None, Tokenizer] = {}
        # Benchmarks with random weights: decode exactly max_new tokens per row (random weights
        # never say end-of-text, and their attention jumps about).
        self.force_tokens_per_second: float | None = None
        self.last_steps = 0  # decoder steps of the last batch
        # The fallback's samples (eager steps) come from the engine's own generator: what a stream is
        # told does not depend on what else in the process drew random numbers (a test's words changed
        # with the tests that ran before it), and a run of the same audio decodes the same.
        self._generator = torch.Generator(device=model.device).manual_seed(0)
        # Process CPU seconds of the last `transcribe_batch`: (encoder, decoder and the rest), for
        # the scheduler's per-stage accounting (`streamserver_compute_cpu_seconds`).
        self.last_cpu = (0.0, 0.0)
        self.max_batch = max_batch
        self._graphs = (model.device.type == "cuda") if cuda_graphs is None else cuda_graphs
        self._step: DecoderStep | None = None
        self._suppress: dict[int, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- public ---------------------------------------------------------
    def transcribe(self, audio: np.ndarray, prompt: str = "", language: str | None = None) -> list[Segment]:
        return self.transcribe_batch([TranscribeJob(audio, prompt, language)])[0]

    @torch.inference_mode()
    def transcribe_batch(self, jobs: list[TranscribeJob]) -> list[list[Segment]]:
        """Segments of each job's audio, times relative to its first sample."""
        out: list[list[Segment]] = [[] for _ in jobs]
        live = [i for i, job in enumerate(jobs) if job.audio.size]
        self.last_cpu = (0.0, 0.0)
        if not live:
            return out
        started = time.process_time()
        encoded, windows, frames = self.encode([jobs[i].audio for i in live], [jobs[i].whole_window for i in live])
        encoded_at = time.process_time()
        final: dict[int, tuple[_Row, np.ndarray | None]] = {}
        # An utterance's last decode, which nothing will check after it, is a beam search (at most
        # `searches_per_round` of them: each is a decode of its own, and the round waits for it);
        # one that fails the quality checks joins the greedy rows below and their fallback.
        searched = [k for k, i in enumerate(live) if final_search.searchable(self, jobs[i])]
        for k in searched[: self.searches_per_round]:
            found = final_search.search(self, jobs[live[k]], encoded[k:k + 1], windows[k], frames[k])
            if found is not None and (found[0].silent or not found[0].degenerate):
                final[k] = found
        todo = [k for k in range(len(live)) if k not in final]
        # openai-whisper's fallback: a decode that fails the quality checks is decoded again, sampling
        # at the next temperature, until one passes (or is silence). Not a job a later decode hears
        # again (`TranscribeJob.again`): its second chance is that decode, a second later with more
        # audio, where each resample is a whole decode that every stream of the device waits for
        # (laughter, a hum, "words words words" failed every temperature: 1-5 s of CPU each time).
        for temperature in self.temperatures if todo else ():
            sub = encoded if len(todo) == len(live) else encoded[todo]
            rows = self._rows([jobs[live[k]] for k in todo], sub, [windows[k] for k in todo],
                              [frames[k] for k in todo], temperature)
            weights = self._decode(rows, sub)
            retry = []
            for k, row, w in zip(todo, rows, weights):
                final[k] = (row, w)
                if row.degenerate and not row.silent and not row.job.again and not self.force_tokens_per_second:
                    retry.append(k)
            if not retry:
                break
            todo = retry
        for k, i in enumerate(live):
            row, w = final[k]
            out[i] = [] if row.silent or self._untrusted(row) else self._segments(row, w)
        self.last_cpu = (encoded_at - started, time.process_time() - encoded_at)
        return out

    def _untrusted(self, row: _Row) -> bool:
        """A continuation of committed text (AlignAtt's forced prefix) that failed the checks (at every
        temperature, or greedy for a job heard `again`) says nothing. openai-whisper keeps its last
        sample because a window has no second chance; a stream's next decode is its second chance, and
        after the last words of an utterance the samples are what Whisper says over nothing (a lone
        "You" after the final sentence)."""
        return bool(row.job.prefix.strip()) and row.degenerate and not self.force_tokens_per_second

    def encode(self, audios: list[np.ndarray], whole: list[bool] | None = None) -> tuple[torch.Tensor, list[int], list[int]]:
        """Encoder output for each audio, padded to the longest bucket.

        Returns ([B, T, d], each row's window in encoder positions, each row's positions
        that hold audio). Audios of one bucket are encoded together; a row's output
        depends only on its own audio. `whole`: rows whose window is 30 s whatever the bucket.
        Rows of the very same audio array in the same window (`TranscribeTogether`: an utterance's last
        decode and its ending check) are encoded once.
        """
        whole = whole or [False] * len(audios)
        windows = [_window_frames(30.0) if w else self._bucket_frames(len(a)) for a, w in zip(audios, whole)]
        width = max(windows) // 2
        result = torch.zeros(len(audios), width, self.dims.n_audio_state, dtype=self.dtype, device=self.device)
        first: dict[tuple[int, int], int] = {}  # (audio's identity, window) -> the row that encodes it
        copies = [first.setdefault((id(a), w), i) for i, (a, w) in enumerate(zip(audios, windows))]
        for frames in sorted(set(windows)):
            same = [i for i, w in enumerate(windows) if w == frames and copies[i] == i]
            for k in range(0, len(same), ENCODE_BATCH):  # activations stay bounded whatever the batch
                idx = same[k:k + ENCODE_BATCH]
                mel = self._mel([audios[i] for i in idx], frames)
                result[idx, : frames // 2] = self._encoder(mel)
        for i, source in enumerate(copies):
            if source != i:
                result[i] = result[source]
        valid = [max(1, math.ceil(len(a) / HOP_LENGTH / 2)) for a in audios]
        return result, [w // 2 for w in windows], [min(v, w // 2) for v, w in zip(valid, windows)]

    def stream_bytes(self) -> int:
        """Device memory one stream adds to a batch at most (30-s window, full caches)."""
        d = self.dims
        itemsize = 2 if self.fp16 else 4
        audio = 30 * SAMPLE_RATE * 4
        mel = d.n_mels * 3000 * 4
        encoded = d.n_audio_ctx * d.n_audio_state * itemsize * 3  # output + a block's activations
        self_kv = 2 * d.n_text_layer * d.n_text_ctx * d.n_text_state * itemsize
        cross_kv = 2 * d.n_text_layer * d.n_audio_ctx * d.n_text_state * itemsize
        return audio + mel + encoded + self_kv + cross_kv

    def measure_stream_bytes(self, streams: int = 4) -> int:
        """Device memory one stream adds to a round: measured on CUDA as the peak of a batch of
        `streams` full 29-s windows over what was allocated before; elsewhere `stream_bytes()`."""
        if self.device.type != "cuda":
            return self.stream_bytes()
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        noise = (0.01 * np.random.default_rng(0).standard_normal(29 * SAMPLE_RATE)).astype(np.float32)
        self.transcribe_batch([TranscribeJob(noise)] * streams)
        torch.cuda.synchronize(self.device)
        return int((torch.cuda.max_memory_allocated(self.device) - base) / streams)

    def warm_up(self) -> None:
        """A first decode (kernels picked, caches filled) and, with CUDA graphs, the decoder step's
        buffers for `max_batch` rows and its graph for every batch a round can run at (greedy and
        sampling), for every window length: a graph captured when a round first reaches a new batch
        size holds that round, and so every stream of the device, up by the capture."""
        t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
        if self._graphs:
            self._capture_graphs()
        self.transcribe(0.01 * np.sin(2 * np.pi * 220 * t).astype(np.float32))

    def _capture_graphs(self) -> None:
        started = time.perf_counter()
        positions = self._window_positions()
        _, step = self._stepper(self.max_batch, positions[-1])
        sizes = sorted({step.batch_size(rows) for rows in range(1, self.max_batch + 1)})
        for t in positions:
            for sampling in (False, True):
                step.sampling = sampling
                for n in sizes:
                    step.prepare(n, t)
        step.sampling = False
        log.info("decoder step: %d CUDA graphs (batches %s, %d window length(s)) in %.1f s",
                 len(step.graphs), sizes, len(positions), time.perf_counter() - started)

    def _window_positions(self) -> list[int]:
        """Every encoder width a round can have: one per window bucket (just 1500, 30 s, by default)."""
        step = self.bucket_seconds or 30.0
        return sorted({_window_frames(k * step) // 2 for k in range(1, math.ceil(30.0 / step) + 1)})

    # -- audio → encoder ----------------------------------------------------
    def _bucket_frames(self, samples: int) -> int:
        seconds = max(max(samples, 1) / SAMPLE_RATE + MIN_SILENCE_AFTER, self.min_window_seconds)
        bucket = math.ceil(seconds / self.bucket_seconds) * self.bucket_seconds if self.bucket_seconds else 30.0
        return _window_frames(bucket)

    def _mel(self, audios: list[np.ndarray], frames: int) -> torch.Tensor:
        """Log-mel like `whisper.log_mel_spectrogram` (per-row max) of each audio, then zeros up to
        `frames`: openai-whisper's `transcribe` pads a short window in the log-mel domain (zeros), not
        with the log-mel of silent audio, and the model hears where speech ends from that. Padding with
        silence changed the decode of real speech: last words went missing after a pause."""
        n = frames * HOP_LENGTH
        batch = torch.zeros(len(audios), n, device=self.device)
        for i, a in enumerate(audios):
            a = a[:n]
            batch[i, : len(a)] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)
        stft = torch.stft(batch, N_FFT, HOP_LENGTH, window=self._window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log = torch.clamp(self._filters @ power, min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        mel = ((log + 4.0) / 4.0)[..., :frames]
        for i, a in enumerate(audios):
            mel[i, :, len(a) // HOP_LENGTH:] = 0.0
        return mel

    def _encoder(self, mel: torch.Tensor) -> torch.Tensor:
        enc = self.model.encoder
        x = F.gelu(enc.conv1(mel.to(self.encoder_dtype)))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = (x + enc.positional_embedding[: x.shape[1]]).to(self.encoder_dtype)
        for block in enc.blocks:
            x = block(x)
        return enc.ln_post(x).to(self.dtype)

    # -- decoding -----------------------------------------------------------
    def _tokenizer(self, language: str | None) -> Tokenizer:
        if language not in self._tokenizers:
            self._tokenizers[language] = get_tokenizer(
                self.model.is_multilingual, num_languages=self.model.num_languages, language=language, task="transcribe"
            )
        return self._tokenizers[language]

    def _rows(self, jobs: list[TranscribeJob], encoded: torch.Tensor, windows: list[int], frames: list[int],
              temperature: float = 0.0) -> list[_Row]:
        languages = [job.language if job.language not in (None, "auto") else self.language for job in jobs]
        if self.model.is_multilingual and any(lang is None for lang in languages):
            detected = self._detect_languages(encoded, windows)
            languages = [lang or found for lang, found in zip(languages, detected)]
        if not self.model.is_multilingual:
            languages = ["en"] * len(jobs)
        rows = []
        for job, lang, w, f in zip(jobs, languages, windows, frames):
            tok = self._tokenizer(lang)
            # Timestamps, as in openai-whisper's `transcribe` (the model decodes most like it was
            # trained to, and a timestamp past the audio ends the row); AlignAtt's forced prefix and
            # attention stop decode without them, as SimulStreaming does.
            timestamps = not job.prefix.strip() and job.stop_before_end is None
            context = list(tok.sot_sequence) + ([] if timestamps else [tok.no_timestamps])
            # As openai-whisper: when the prompt is at a higher temperature, do not condition on it.
            if job.prompt.strip() and temperature <= 0.5:
                prompt = tok.encode(" " + job.prompt.strip())[-(self.dims.n_text_ctx // 2 - 1):]
                context = [tok.sot_prev, *prompt, *context]
            sot_index = context.index(tok.sot)
            if job.prefix.strip():
                context += tok.encode(" " + job.prefix.strip())[-(self.dims.n_text_ctx // 4):]
            budget = self.dims.n_text_ctx - len(context) - 1
            max_new = max(1, min(budget, self.dims.n_text_ctx // 2))
            per_second = max_new
            if self.max_tokens_per_second:
                per_second = int(self.max_tokens_per_second * len(job.audio) / SAMPLE_RATE) + TOKENS_FOR_ANY_WINDOW
            stop_at = None
            if job.stop_before_end is not None:
                stop_at = max(1, f - int(job.stop_before_end * TOKENS_PER_SECOND))
            draft = None
            if job.draft.strip() and temperature == 0 and not job.prefix.strip() and stop_at is None:
                draft = Draft(tok.encode(" " + job.draft.strip()))
            rows.append(_Row(job, tok, context, min(max_new, per_second), w, f, [], temperature, timestamps, sot_index,
                             stop_at=stop_at, last_heard=int(job.prefix_end * TOKENS_PER_SECOND),
                             budget_per_second=per_second < max_new, draft=draft))
        return rows

    def _detect_languages(self, encoded: torch.Tensor, windows: list[int]) -> list[str]:
        tok = self._tokenizer(None)
        tokens = torch.full((len(windows), 1), tok.sot, device=self.device)
        cross = self._cross_kv(encoded)
        logits, _, _ = self._forward(tokens, torch.zeros_like(tokens), None, cross, self._cross_mask(windows, encoded),
                                     False)
        lang_ids = torch.tensor(tok.all_language_tokens, device=self.device)
        best = logits[:, lang_ids].argmax(-1).tolist()
        return [tok.all_language_codes[i] for i in best]

    def _decode(self, rows: list[_Row], encoded: torch.Tensor) -> list[torch.Tensor | None]:
        """Greedy decoding of all rows at once; returns each row's alignment-head weights [H, n_text+1, frames].
        On a CPU, one row decodes on one thread: its steps are too small to share, and a second thread
        spent most of each waiting (tiny.en, 2 cores: 40 % more CPU for a 16 % shorter decode). A batch
        of streams keeps every thread (at 8 rows the second saves 40 % of the wall time)."""
        if self.device.type != "cpu" or len(rows) > 1 or torch.get_num_threads() == 1:
            return self._decode_rows(rows, encoded)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._decode_rows(rows, encoded)
        finally:
            torch.set_num_threads(threads)

    def _decode_rows(self, rows: list[_Row], encoded: torch.Tensor) -> list[torch.Tensor | None]:
        B, T = len(rows), encoded.shape[1]
        buf, stepper, n, logp, attn = self._prefill(rows, encoded)
        tok, S = rows[0].tokenizer, buf.text_ctx
        temps = buf.temp[:B]
        first = pick(logp, temps, stepper.sampling, stepper.generator)
        took_ts = first >= tok.timestamp_begin
        buf.last_ts[:B] = took_ts
        buf.ts_max[:B] = torch.where(took_ts, first, buf.ts_max[:B])
        first_logprob = logp.gather(1, first[:, None])[:, 0]
        heard = self._attended(attn, buf.cross_ok[:B, 0, :, :T])
        # The alignment heads' scores, in chunks of decoder passes; each row's own columns among them
        # (a pass over a draft gives each row as many as it took tokens there).
        chunks = [attn[:, :, -1:]] if attn is not None else []
        columns: list[list[int]] = [[0] for _ in rows]
        width = 1
        buf.token[:B, 0] = first
        picked = [[p] for p in zip(*torch.stack([first, heard, first_logprob.double()]).tolist())]  # one sync
        slot = int(buf.slot)
        self.last_steps = 0
        while True:
            active = [i for i, r in enumerate(rows) if not r.done and self._take(r, picked[i], tok)]
            if not active or slot >= S:
                break
            self.last_steps += 1
            drafts = {i: self._ahead(rows[i], min(MAX_DRAFT_TOKENS, S - slot - 1)) for i in active}
            K = 0 if stepper.sampling else max(len(d) for d in drafts.values())
            if K:
                lengths = torch.tensor([len(drafts.get(i, ())) for i in range(n)], device=self.device)
                padded = torch.full((n, K), tok.eot, dtype=torch.long, device=self.device)
                for i, d in drafts.items():
                    padded[i, :len(d)] = torch.tensor(d, device=self.device)
                found = stepper.verify(n, T, padded, lengths)
                took = found.accepted[:B].tolist()
                if found.attn is not None:
                    chunks.append(found.attn[:B])
                table = torch.stack([found.picks[:B].double(), found.heard[:B].double(), found.logprob[:B].double()],
                                    dim=-1).tolist()  # one sync per pass
                for i in active:
                    columns[i] += range(width, width + took[i] + 1)
                    picked[i] = table[i][:took[i] + 1]
                width += K + 1
                slot += K + 1
            else:
                stepper.step(n, T)
                if attn is not None:
                    chunks.append(buf.attn[:B, :, :, :T].clone())
                for i in active:
                    columns[i].append(width)
                width += 1
                slot += 1
                now = torch.stack([buf.next[:B].double(), buf.heard[:B].double(), buf.logprob[:B].double()]).tolist()
                for i in active:
                    picked[i] = [(now[0][i], now[1][i], now[2][i])]
        if not chunks:
            return [None] * len(rows)
        weights = torch.cat(chunks, dim=2)
        longest = max(len(c) for c in columns)
        index = torch.tensor([c + c[-1:] * (longest - len(c)) for c in columns], device=weights.device)
        weights = weights.gather(2, index[:, None, :, None].expand(B, weights.shape[1], longest, T))
        out: list[np.ndarray | None] = []
        for k in range(0, B, ENCODE_BATCH):
            out += self._alignment(weights[k:k + ENCODE_BATCH], rows[k:k + ENCODE_BATCH])
        return out

    def _take(self, row: _Row, picked: list[tuple[float, float, float]], tok: Tokenizer) -> bool:
        """Append the tokens a decoder pass picked for `row` (one, or a run along its draft); False
        once the row has ended."""
        for token, position, logprob in picked:
            if not self._accept(row, int(token), int(position), logprob, tok.eot):
                return False
            if row.draft is not None and int(token) < tok.eot:
                row.draft.follow(int(token))
        return True

    @staticmethod
    def _ahead(row: _Row, limit: int) -> list[int]:
        """The drafted tokens to check after `row`'s last token: none right after a lone timestamp
        (another must follow it) or when the row has no draft to follow."""
        if row.draft is None or limit <= 0:
            return []
        begin = row.tokenizer.timestamp_begin
        if len(row.tokens) >= 2 and row.tokens[-1] >= begin > row.tokens[-2]:
            return []
        return row.draft.ahead(limit)

    def _prefill(self, rows: list[_Row], encoded: torch.Tensor, graphs: bool | None = None, room: int = 0):
        """A round's buffers with every row's forced tokens (prompt, start of transcript, AlignAtt's
        prefix) in the self-attention cache, left-padded to one length (`room`: buffers for at least
        that many rows). Returns (buffers, stepper, the batch it steps at, the first new token's
        log-probabilities [B, vocab], the alignment heads' attention over the forced tokens or None)."""
        B, T = len(rows), encoded.shape[1]
        buf, stepper = self._stepper(max(B, room), T, graphs)
        n = stepper.batch_size(B)
        stepper.sampling = any(r.temperature > 0 for r in rows)
        stepper.prepare(n, T)  # before the buffers are filled: a capture's warm-up scribbles on them
        dev = self.device
        L0 = max(len(r.context) for r in rows)
        pads = torch.tensor([L0 - len(r.context) for r in rows], device=dev)
        tokens = torch.zeros(B, L0, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            tokens[i, L0 - len(r.context):] = torch.tensor(r.context, device=dev)
        buf.key_ok[:n] = True  # rows past B are padding: let them see something, never NaN
        buf.key_ok[:B] = buf.slots[None, :] >= pads[:, None]
        cross = self._cross_kv(encoded, buf)
        positions_t = torch.arange(buf.audio_ctx, device=dev)[None, :]
        windows = torch.tensor([r.window for r in rows], device=dev)
        buf.cross_ok[:n] = positions_t[:, None, None, :] == 0
        buf.cross_ok[:B] = (positions_t < windows[:, None])[:, None, None, :]
        tok = rows[0].tokenizer
        buf.suppress.zero_()
        buf.suppress[self._suppress_ids(tok)] = -math.inf
        temps = torch.tensor([r.temperature for r in rows], dtype=torch.float32, device=dev)
        buf.temp[:n] = 0.0
        buf.temp[:B] = temps
        sot_at = torch.tensor([L0 - len(r.context) + r.sot_index for r in rows], device=dev)
        buf.ts_mode[:n] = False
        buf.ts_mode[:B] = torch.tensor([r.timestamps for r in rows], device=dev)
        buf.pen_ts[:n] = True
        buf.last_ts[:n] = False
        buf.ts_max[:n] = 0
        # Prefill: the forced tokens of every row in one pass, writing the cache's first L0 slots.
        cache = [(buf.self_k[layer][:B], buf.self_v[layer][:B]) for layer in range(self.dims.n_text_layer)]
        positions = (torch.arange(L0, device=dev)[None, :] - pads[:, None]).clamp(min=0)
        causal = torch.ones(L0, L0, dtype=torch.bool, device=dev).tril()
        mask = (causal[None] & buf.key_ok[:B, None, :L0])[:, None]
        logits, attn, at_sot = self._forward(tokens, positions, (cache, 0, mask), cross, buf.cross_ok[:B, :, :, :T],
                                             self._capture(), also_at=sot_at)
        if tok.no_speech is not None:
            for r, p in zip(rows, at_sot.softmax(-1)[:, tok.no_speech].tolist()):
                r.no_speech = p
        last = logits + buf.suppress
        last[:, tok.encode(" ") + [tok.eot]] = -math.inf  # never begin with a blank or end at once
        logp = timestamp_rules(last, *buf.timestamp_state(B), tok.eot, tok.timestamp_begin, first=True)
        buf.pos[:B, 0] = L0 - pads
        buf.slot.fill_(L0)
        return buf, stepper, n, logp, attn

    def _alignment(self, weights: torch.Tensor, rows: list[_Row]) -> list[np.ndarray | None]:
        """Token-by-audio alignment matrices of all rows at once, as openai-whisper's `find_alignment`
        builds them (softmax over the row's audio, normalised across its tokens, median-filtered along
        time, averaged over heads); one copy to the host for the whole batch."""
        B, H, N, T = weights.shape
        dev = weights.device
        frames = torch.tensor([r.frames for r in rows], device=dev)
        counts = torch.tensor([len(r.tokens) + 1 for r in rows], device=dev)
        in_audio = (torch.arange(T, device=dev)[None, :] < frames[:, None])[:, None, None, :]
        in_text = (torch.arange(N, device=dev)[None, :] < counts[:, None])[:, None, :, None].float()
        w = weights.float().masked_fill(~in_audio, -math.inf).softmax(-1).nan_to_num(0.0)
        n = counts[:, None, None, None].float()
        mean = (w * in_text).sum(-2, keepdim=True) / n
        std = (((w - mean) ** 2) * in_text).sum(-2, keepdim=True).div(n).sqrt()
        w = (w - mean) / (std + 1e-8)
        if T > 3:
            w = F.pad(w.reshape(B * H, N, T), (3, 3), mode="reflect").unfold(-1, 7, 1).median(-1).values
        matrices = w.reshape(B, H, N, T).mean(1).cpu().numpy()
        return [matrices[i, : len(r.tokens) + 1, : r.frames] for i, r in enumerate(rows)]

    def _stepper(self, rows: int, audio_ctx: int, graphs: bool | None = None) -> tuple[StepBuffers, DecoderStep]:
        """On CUDA one set of buffers, kept (its graphs point into it) and grown when a round needs
        more rows (in powers of two up to `max_batch`) or longer windows; on the CPU (or with
        `graphs=False`: a beam search, whose rows are reordered between steps) buffers of this
        batch's size, made per round."""
        if self._graphs if graphs is None else graphs:
            old = self._step.buf if self._step is not None else None
            if old is None or old.rows < rows or old.audio_ctx < audio_ctx:
                size = max(rows, min(self.max_batch, 1 << math.ceil(math.log2(rows))), old.rows if old else 0)
                ctx = max(audio_ctx, old.audio_ctx if old else 0)
                self._step = None  # drop the old buffers and the graphs that point into them first
                buf = StepBuffers(self.model, size, ctx, len(self._align), self.dtype, self.device)
                self._step = DecoderStep(self.model, buf, self._align, use_graphs=True,
                                         vocabulary=self._vocabulary, **self._special())
            return self._step.buf, self._step
        buf = StepBuffers(self.model, rows, audio_ctx, len(self._align), self.dtype, self.device)
        return buf, DecoderStep(self.model, buf, self._align, use_graphs=False, vocabulary=self._vocabulary,
                                generator=self._generator, **self._special())

    def _special(self) -> dict[str, int]:
        tok = self._tokenizer(self.language)
        return {"eot": tok.eot, "timestamp_begin": tok.timestamp_begin}

    def _capture(self) -> bool:
        return bool(self._align)

    def _attended(self, attn: torch.Tensor | None, window_mask: torch.Tensor) -> torch.Tensor:
        """The window position each row's newest token attends to most (alignment heads' mean), [B].
        The padding after the audio counts: a token looking there is not hearing speech, and
        AlignAtt stops at it (`stop_at` is at or before the audio's end)."""
        if attn is None:
            return torch.zeros(window_mask.shape[0], dtype=torch.long, device=self.device)
        return most_attended(attn[:, :, -1, : window_mask.shape[-1]], window_mask)

    def _accept(self, row: _Row, token: int, position: int, logprob: float, eot: int) -> bool:
        """Append `token` to `row` unless the row ends here: end of text, the token budget, or
        (AlignAtt) a token attending past `stop_at` or jumping back (`REWIND_SECONDS`). Degenerate
        decodes are not cut here: the quality checks after the decode see them whole (`transcribe_batch`)."""
        if self.force_tokens_per_second:
            if len(row.tokens) >= row.max_new:
                row.done = True
                return False
        elif token == eot:
            row.sum_logprob += logprob
            row.done = True
            return False
        elif len(row.tokens) >= row.max_new:
            row.done = True
            row.overran = row.budget_per_second
            return False
        elif ((row.stop_at is not None and (position >= row.stop_at
                                            or row.last_heard - position > REWIND_SECONDS * TOKENS_PER_SECOND))
              or token >= row.tokenizer.timestamp_begin + row.frames + TOKENS_PER_SECOND // 2):
            row.done = True  # (the last: a timestamp half a second past the audio, only padding follows)
            return False
        row.last_heard = position
        row.tokens.append(token)
        row.heard.append(position)
        row.sum_logprob += logprob
        return True

    def _cross_kv(self, encoded: torch.Tensor, buf: StepBuffers | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys/values of the encoded audio, written straight
        into `buf`'s preallocated rows when given (no second copy of them exists)."""
        heads = self.dims.n_text_head
        B, T = encoded.shape[:2]
        out = []
        for layer, block in enumerate(self.model.decoder.blocks):
            attn = block.cross_attn
            k, v = split_heads(attn.key(encoded), heads), split_heads(attn.value(encoded), heads)
            if buf is not None:
                k = buf.cross_k[layer][:B, :, :T].copy_(k)
                v = buf.cross_v[layer][:B, :, :T].copy_(v)
            out.append((k, v))
        return out

    def _cross_mask(self, windows: list[int], encoded: torch.Tensor) -> torch.Tensor:
        """Each row attends to its own bucket's positions (audio and the silence after it), as it would alone."""
        T = encoded.shape[1]
        f = torch.tensor(windows, device=self.device)
        return (torch.arange(T, device=self.device)[None, :] < f[:, None])[:, None, None, :]  # [B,1,1,T]

    def _forward(self, tokens, positions, self_attn, cross, cross_mask, capture, also_at=None):
        """Decoder forward over `tokens` [B, n] at `positions`; writes the self-attention cache.

        `self_attn` is (cache, slot, mask) or None (no cache: a one-token probe).
        Returns the last position's logits [B, vocab] (projecting every prompt position onto the
        vocabulary cost more than the rest of the prefill), the alignment heads' weights [B, H, n, T]
        (or None), and the logits at each row's position `also_at` [B] (or None: the start of
        transcript, whose logits give the no-speech probability).
        """
        dec = self.model.decoder
        x = (dec.token_embedding(tokens) + dec.positional_embedding[positions]).to(self.dtype)
        heads = self.dims.n_text_head
        captured = []
        for layer, block in enumerate(dec.blocks):
            h = block.attn_ln(x)
            q, k, v = split_heads(block.attn.query(h), heads), split_heads(block.attn.key(h), heads), split_heads(block.attn.value(h), heads)
            if self_attn is not None:
                cache, slot, mask = self_attn
                kc, vc = cache[layer]
                n = tokens.shape[1]
                kc[:, :, slot: slot + n] = k
                vc[:, :, slot: slot + n] = v
                k, v = kc[:, :, : slot + n], vc[:, :, : slot + n]
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                a = F.scaled_dot_product_attention(q, k, v)
            x = x + block.attn.out(merge_heads(a))
            h = block.cross_attn_ln(x)
            q = split_heads(block.cross_attn.query(h), heads)
            kx, vx = cross[layer]
            a = F.scaled_dot_product_attention(q, kx, vx, attn_mask=cross_mask)
            if capture and layer in self._align_layers:
                sel = [hd for l, hd in self._align if l == layer]
                scale = q.shape[-1] ** -0.5
                captured.append((q[:, sel] @ kx[:, sel].transpose(-1, -2)).float() * scale)
            x = x + block.cross_attn.out(merge_heads(a))
            x = x + block.mlp(block.mlp_ln(x))
        x = dec.ln(x)
        logits = self._vocabulary(x[:, -1]).float()
        extra = None
        if also_at is not None:
            extra = self._vocabulary(x[torch.arange(x.shape[0], device=x.device), also_at]).float()
        return logits, (torch.cat(captured, dim=1) if captured else None), extra

    def _suppress_ids(self, tok: Tokenizer) -> torch.Tensor:
        key = id(tok)
        if key not in self._suppress:
            ids = set(tok.non_speech_tokens)
            ids |= {tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_timestamps}
            if tok.no_speech is not None:
                ids.add(tok.no_speech)
            ids |= set(tok.all_language_tokens)  # timestamps: per row, by `timestamp_rules`
            self._suppress[key] = torch.tensor(sorted(i for i in ids if i < self.dims.n_vocab), device=self.device)
        return self._suppress[key]

    # -- words ----------------------------------------------------------------
    def _segments(self, row: _Row, matrix: np.ndarray | None) -> list[Segment]:
        tok = row.tokenizer
        text = row.text_tokens
        if not text:
            return []
        if matrix is not None and row.timestamps:  # the alignment rows of the text tokens, and of the end
            at = [j for j, t in enumerate(row.tokens) if t < tok.eot]
            matrix = matrix[at + [at[-1] + 1]]
        words, word_tokens = tok.split_to_word_tokens(text + [tok.eot])
        words, word_tokens = words[:-1], word_tokens[:-1]
        if row.job.prefix.strip() or row.stop_at is not None:
            starts, ends = _attended_times(row.heard, word_tokens)  # DTW needs the whole text; this is the new part
            timed = _merge_punctuation([Word(s, e, w) for w, s, e in zip(words, starts, ends)],
                                       continues=bool(row.job.prefix.strip()))
        else:
            starts, ends = _word_times(matrix, word_tokens, row.frames)
            timed = _unstretched(_merge_punctuation([Word(s, e, w) for w, s, e in zip(words, starts, ends)]))
        # The last guard: temperature fallback removes most loops, but looped text must never reach
        # a caption or a file's result, whatever produced it.
        return _sentences(without_repeats(timed, degenerate=row.compression_ratio > COMPRESSION_RATIO_LIMIT))


def _window_frames(seconds: float) -> int:
    """Mel frames of a window of `seconds` (Whisper hears at most 30 s)."""
    return int(min(30.0, seconds) * FRAMES_PER_SECOND)


def _word_times(matrix: np.ndarray | None, word_tokens: list[list[int]], frames: int) -> tuple[list[float], list[float]]:
    """Each word's start and end: DTW through the token-by-audio matrix (openai-whisper's `dtw`)."""
    n = sum(len(t) for t in word_tokens)
    if matrix is None or frames < 8 or matrix.shape[0] < n + 1:
        edges = np.linspace(0.0, frames / TOKENS_PER_SECOND, len(word_tokens) + 1)
        return edges[:-1].tolist(), edges[1:].tolist()
    text_idx, time_idx = dtw(-torch.from_numpy(matrix[: n + 1]).double())
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / TOKENS_PER_SECOND
    bounds = np.minimum(np.cumsum([0] + [len(t) for t in word_tokens]), len(jump_times) - 1)
    starts = jump_times[bounds[:-1]]
    ends = np.maximum(jump_times[bounds[1:]], starts + 0.02)
    return starts.tolist(), ends.tolist()


def _attended_times(heard: list[int], word_tokens: list[list[int]]) -> tuple[list[float], list[float]]:
    """Word times from the position each token attended to (AlignAtt's own signal), kept monotonic:
    a word starts where its first token looked and ends where the next word starts."""
    firsts = np.cumsum([0] + [len(t) for t in word_tokens])[:-1]
    starts = np.maximum.accumulate(np.array([heard[min(i, len(heard) - 1)] for i in firsts], dtype=float))
    starts = starts / TOKENS_PER_SECOND
    last = (max(heard) + 1) / TOKENS_PER_SECOND if heard else 0.0
    ends = np.append(starts[1:], max(last, starts[-1] + 0.1) if len(starts) else last)
    ends = np.maximum(ends, starts + 0.02)
    return starts.tolist(), ends.tolist()


def _half(model: whisper.model.Whisper) -> whisper.model.Whisper:
    """fp16 weights, except the layer norms: openai-whisper's LayerNorm runs in fp32 and casts back."""
    return _to_dtype(model, torch.float16)


def _to_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    module.to(dtype)
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
    return module


def _cpu_has_bf16(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# A word aligned longer than this many times the median word (the median capped at MAX_MEDIAN_WORD)
# has been stretched over a pause by the alignment.
STRETCH_FACTOR = 2.0
MAX_MEDIAN_WORD = 0.7


def _unstretched(words: list[Word]) -> list[Word]:
    """Words the DTW alignment stretched over a pause, shrunk back to a plausible length.

    The alignment path must cross the silence next to a word somewhere, and gives it to a word:
    the first word after a pause starts seconds early ("So," from 0.0 s for speech at 5.6 s), a
    sentence's last word ends seconds late. A sentence's last word loses the tail (the pause is
    after it); any other word loses the head (the pause is before it). The same idea as
    openai-whisper's truncation of long words in `add_word_timestamps`."""
    lengths = [w.end - w.start for w in words if w.end > w.start]
    if not lengths:
        return words
    limit = STRETCH_FACTOR * min(MAX_MEDIAN_WORD, float(np.median(lengths)))
    out = []
    for w in words:
        if w.end - w.start > limit:
            if w.text.rstrip().endswith(SENTENCE_END):
                w = Word(w.start, w.start + limit, w.text)
            else:
                w = Word(w.end - limit, w.end, w.text)
        out.append(w)
    return out


def _merge_punctuation(words: list[Word], continues: bool = False) -> list[Word]:
    """A word that is only punctuation joins the word before it (as openai-whisper's merge does).
    Leading the text it says nothing and is dropped (a decode of noise that is only " ." would
    otherwise be a caption line of its own); unless the words `continue` a forced prefix, whose
    last word the period ends."""
    out: list[Word] = []
    for w in words:
        bare = w.text.strip() and all(c in string.punctuation for c in w.text.strip())
        if bare and not out and not continues:
            continue
        if bare and out and not w.text.startswith(" "):
            prev = out[-1]
            out[-1] = Word(prev.start, max(prev.end, w.start), prev.text + w.text)
        else:
            out.append(w)
    return out


def _sentences(words: list[Word]) -> list[Segment]:
    """Without timestamp tokens, a segment is a clause: it ends at a word ending in . ? ! , ; or :
    (the places where a streaming policy may cut its audio buffer)."""
    segments, current = [], []
    for w in words:
        current.append(w)
        if w.text.rstrip().endswith(CLAUSE_END):
            segments.append(Segment(current[0].start, current[-1].end, tuple(current)))
            current = []
    if current:
        segments.append(Segment(current[0].start, current[-1].end, tuple(current)))
    return segments
