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

import math
import string
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import whisper
from whisper.audio import HOP_LENGTH, N_FFT, SAMPLE_RATE, mel_filters
from whisper.timing import dtw, median_filter
from whisper.tokenizer import Tokenizer, get_tokenizer

from .asr_types import Segment, TranscribeJob, Word

FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # mel frames
TOKENS_PER_SECOND = FRAMES_PER_SECOND // 2  # encoder positions
SENTENCE_END = (".", "?", "!")
BACKTRACK = 2 * TOKENS_PER_SECOND  # a token attending this far behind the text so far is a repeat
MIN_SILENCE_AFTER = 1.0  # seconds of padding every window keeps after its audio (Whisper ends text on silence)


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
    done: bool = False
    furthest: int = 0  # furthest audio position a token has attended to


class BatchedWhisper:
    """One loaded Whisper on one device, shared by all of its streams; keeps no per-stream state.

    `transcribe_batch` is the scheduler's entry; `transcribe` is a batch of one.
    """

    def __init__(
        self,
        model: whisper.model.Whisper,
        language: str | None = None,
        name: str = "",
        bucket_seconds: float = 5.0,
        max_tokens_per_second: float = 8.0,
    ) -> None:
        self.fp16 = model.device.type == "cuda"
        self.model = model.half() if self.fp16 else model
        self.model.eval()
        self.name = name
        self.language = None if language in (None, "auto") else language
        self.bucket_seconds = bucket_seconds
        self.max_tokens_per_second = max_tokens_per_second
        dims = model.dims
        self.dims = dims
        self.dtype = torch.float16 if self.fp16 else torch.float32
        self._filters = mel_filters(model.device, dims.n_mels)
        self._window = torch.hann_window(N_FFT, device=model.device)
        heads = model.alignment_heads.to_dense() if model.alignment_heads.is_sparse else model.alignment_heads
        self._align = [(int(l), int(h)) for l, h in heads.nonzero().tolist()]
        self._align_layers = sorted({l for l, _ in self._align})
        self._tokenizers: dict[str | None, Tokenizer] = {}
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
        if not live:
            return out
        encoded, windows, frames = self.encode([jobs[i].audio for i in live])
        rows = self._rows([jobs[i] for i in live], encoded, windows, frames)
        weights = self._decode(rows, encoded)
        for i, row, w in zip(live, rows, weights):
            out[i] = self._segments(row, w)
        return out

    def encode(self, audios: list[np.ndarray]) -> tuple[torch.Tensor, list[int], list[int]]:
        """Encoder output for each audio, padded to the longest bucket.

        Returns ([B, T, d], each row's window in encoder positions, each row's positions
        that hold audio). Audios of one bucket are encoded together; a row's output
        depends only on its own audio.
        """
        windows = [self._bucket_frames(len(a)) for a in audios]
        width = max(windows) // 2
        result = torch.zeros(len(audios), width, self.dims.n_audio_state, dtype=self.dtype, device=self.device)
        for frames in sorted(set(windows)):
            idx = [i for i, w in enumerate(windows) if w == frames]
            mel = self._mel([audios[i] for i in idx], frames)
            result[idx, : frames // 2] = self._encoder(mel)
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

    def warm_up(self) -> None:
        t = np.arange(SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
        self.transcribe(0.01 * np.sin(2 * np.pi * 220 * t).astype(np.float32))

    # -- audio → encoder ----------------------------------------------------
    def _bucket_frames(self, samples: int) -> int:
        seconds = max(samples, 1) / SAMPLE_RATE + MIN_SILENCE_AFTER
        bucket = math.ceil(seconds / self.bucket_seconds) * self.bucket_seconds if self.bucket_seconds else 30.0
        return int(min(30.0, bucket) * FRAMES_PER_SECOND)

    def _mel(self, audios: list[np.ndarray], frames: int) -> torch.Tensor:
        """Log-mel like `whisper.log_mel_spectrogram` (per-row max), zero-padded to `frames`."""
        n = frames * HOP_LENGTH
        batch = torch.zeros(len(audios), n, device=self.device)
        for i, a in enumerate(audios):
            a = a[:n]
            batch[i, : len(a)] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)
        stft = torch.stft(batch, N_FFT, HOP_LENGTH, window=self._window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log = torch.clamp(self._filters @ power, min=1e-10).log10()
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        return ((log + 4.0) / 4.0)[..., :frames]

    def _encoder(self, mel: torch.Tensor) -> torch.Tensor:
        enc = self.model.encoder
        x = F.gelu(enc.conv1(mel.to(self.dtype)))
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = (x + enc.positional_embedding[: x.shape[1]]).to(self.dtype)
        for block in enc.blocks:
            x = block(x)
        return enc.ln_post(x)

    # -- decoding -----------------------------------------------------------
    def _tokenizer(self, language: str | None) -> Tokenizer:
        if language not in self._tokenizers:
            self._tokenizers[language] = get_tokenizer(
                self.model.is_multilingual, num_languages=self.model.num_languages, language=language, task="transcribe"
            )
        return self._tokenizers[language]

    def _rows(self, jobs: list[TranscribeJob], encoded: torch.Tensor, windows: list[int], frames: list[int]) -> list[_Row]:
        languages = [job.language if job.language not in (None, "auto") else self.language for job in jobs]
        if self.model.is_multilingual and any(lang is None for lang in languages):
            detected = self._detect_languages(encoded, windows)
            languages = [lang or found for lang, found in zip(languages, detected)]
        if not self.model.is_multilingual:
            languages = ["en"] * len(jobs)
        rows = []
        for job, lang, w, f in zip(jobs, languages, windows, frames):
            tok = self._tokenizer(lang)
            context = list(tok.sot_sequence) + [tok.no_timestamps]
            if job.prompt.strip():
                prompt = tok.encode(" " + job.prompt.strip())[-(self.dims.n_text_ctx // 2 - 1):]
                context = [tok.sot_prev, *prompt, *context]
            seconds = len(job.audio) / SAMPLE_RATE
            budget = self.dims.n_text_ctx - len(context) - 1
            max_new = max(1, min(budget, self.dims.n_text_ctx // 2, int(self.max_tokens_per_second * seconds) + 10))
            rows.append(_Row(job, tok, context, max_new, w, f, []))
        return rows

    def _detect_languages(self, encoded: torch.Tensor, windows: list[int]) -> list[str]:
        tok = self._tokenizer(None)
        tokens = torch.full((len(frames), 1), tok.sot, device=self.device)
        cross = self._cross_kv(encoded)
        logits, _ = self._forward(tokens, torch.zeros_like(tokens), None, cross, self._cross_mask(windows, encoded), False)
        lang_ids = torch.tensor(tok.all_language_tokens, device=self.device)
        best = logits[:, -1, lang_ids].argmax(-1).tolist()
        return [tok.all_language_codes[i] for i in best]

    def _decode(self, rows: list[_Row], encoded: torch.Tensor) -> list[torch.Tensor]:
        """Greedy decoding of all rows at once; returns each row's alignment-head weights [H, n_text+1, frames]."""
        B = len(rows)
        L0 = max(len(r.context) for r in rows)
        steps = max(r.max_new for r in rows)
        pads = [L0 - len(r.context) for r in rows]
        dev = self.device
        tokens = torch.zeros(B, L0, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            tokens[i, pads[i]:] = torch.tensor(r.context, device=dev)
        pad_t = torch.tensor(pads, device=dev)
        total = L0 + steps
        key_ok = torch.arange(total, device=dev)[None, :] >= pad_t[:, None]  # [B, total]
        cache = self._self_cache(B, total)
        cross = self._cross_kv(encoded)
        cross_mask = self._cross_mask([r.window for r in rows], encoded)
        positions = (torch.arange(L0, device=dev)[None, :] - pad_t[:, None]).clamp(min=0)
        causal = torch.ones(L0, L0, dtype=torch.bool, device=dev).tril()
        mask = (causal[None] & key_ok[:, None, :L0])[:, None]  # [B, 1, L0, L0]
        logits, attn = self._forward(tokens, positions, (cache, 0, mask), cross, cross_mask, self._capture())
        captured = [attn[:, :, -1:]] if attn is not None else []
        tok = rows[0].tokenizer
        suppress = self._suppress_ids(tok)
        blank = torch.tensor(tok.encode(" ") + [tok.eot], device=dev)
        audio_mask = self._cross_mask([r.frames for r in rows], encoded)[:, :, 0]  # [B, 1, T]
        last, heard = logits[:, -1], self._attended(attn, audio_mask)
        for step in range(steps):
            last[:, suppress] = -math.inf
            if step == 0:
                last[:, blank] = -math.inf
            nxt = last.argmax(-1)
            picked = torch.stack([nxt, heard]).tolist()  # one host sync per step
            active = 0
            for i, r in enumerate(rows):
                if not r.done and self._accept(r, picked[0][i], picked[1][i], tok.eot):
                    active += 1
            if not active:
                break
            slot = L0 + step
            pos = (slot - pad_t).clamp(max=self.dims.n_text_ctx - 1)[:, None]
            step_mask = key_ok[:, None, None, : slot + 1]
            logits, attn = self._forward(nxt[:, None], pos, (cache, slot, step_mask), cross, cross_mask, self._capture())
            if attn is not None:
                captured.append(attn)
            last, heard = logits[:, -1], self._attended(attn, audio_mask)
        if not captured:
            return [None] * len(rows)
        weights = torch.cat(captured, dim=2)  # [B, H, steps+1, T]
        return [weights[i, :, : len(r.tokens) + 1, : r.frames] for i, r in enumerate(rows)]

    def _capture(self) -> bool:
        return bool(self._align)

    def _attended(self, attn: torch.Tensor | None, audio_mask: torch.Tensor) -> torch.Tensor:
        """The audio position each row's newest token attends to most (alignment heads' mean), [B]."""
        if attn is None:
            return torch.zeros(audio_mask.shape[0], dtype=torch.long, device=self.device)
        w = attn[:, :, -1, : audio_mask.shape[-1]].masked_fill(~audio_mask, -math.inf).softmax(-1)
        return w.mean(1).argmax(-1)

    def _accept(self, row: _Row, token: int, position: int, eot: int) -> bool:
        """Append `token` to `row` unless the row ends here: end of text, token budget, or a
        hallucinated repeat (its attention jumps back more than `BACKTRACK` into audio already read)."""
        if token == eot or len(row.tokens) >= row.max_new or position < row.furthest - BACKTRACK:
            row.done = True
            return False
        row.tokens.append(token)
        row.furthest = max(row.furthest, position)
        return True

    def _self_cache(self, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        d = self.dims
        shape = (batch, d.n_text_head, length, d.n_text_state // d.n_text_head)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                 torch.zeros(shape, dtype=self.dtype, device=self.device)) for _ in range(d.n_text_layer)]

    def _cross_kv(self, encoded: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        heads = self.dims.n_text_head
        out = []
        for block in self.model.decoder.blocks:
            attn = block.cross_attn
            out.append((_heads(attn.key(encoded), heads), _heads(attn.value(encoded), heads)))
        return out

    def _cross_mask(self, windows: list[int], encoded: torch.Tensor) -> torch.Tensor:
        """Each row attends to its own bucket's positions (audio and the silence after it), as it would alone."""
        T = encoded.shape[1]
        f = torch.tensor(windows, device=self.device)
        return (torch.arange(T, device=self.device)[None, :] < f[:, None])[:, None, None, :]  # [B,1,1,T]

    def _forward(self, tokens, positions, self_attn, cross, cross_mask, capture):
        """Decoder forward over `tokens` [B, n] at `positions`; writes the self-attention cache.

        `self_attn` is (cache, slot, mask) or None (no cache: a one-token probe).
        Returns logits [B, n, vocab] and the alignment heads' weights [B, H, n, T] (or None).
        """
        dec = self.model.decoder
        x = (dec.token_embedding(tokens) + dec.positional_embedding[positions]).to(self.dtype)
        heads = self.dims.n_text_head
        captured = []
        for layer, block in enumerate(dec.blocks):
            h = block.attn_ln(x)
            q, k, v = _heads(block.attn.query(h), heads), _heads(block.attn.key(h), heads), _heads(block.attn.value(h), heads)
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
            x = x + block.attn.out(_merge(a))
            h = block.cross_attn_ln(x)
            q = _heads(block.cross_attn.query(h), heads)
            kx, vx = cross[layer]
            a = F.scaled_dot_product_attention(q, kx, vx, attn_mask=cross_mask)
            if capture and layer in self._align_layers:
                sel = [hd for l, hd in self._align if l == layer]
                scale = q.shape[-1] ** -0.5
                captured.append((q[:, sel] @ kx[:, sel].transpose(-1, -2)).float() * scale)
            x = x + block.cross_attn.out(_merge(a))
            x = x + block.mlp(block.mlp_ln(x))
        x = dec.ln(x)
        logits = (x @ dec.token_embedding.weight.to(x.dtype).T).float()
        return logits, (torch.cat(captured, dim=1) if captured else None)

    def _suppress_ids(self, tok: Tokenizer) -> torch.Tensor:
        key = id(tok)
        if key not in self._suppress:
            ids = set(tok.non_speech_tokens)
            ids |= {tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_timestamps}
            if tok.no_speech is not None:
                ids.add(tok.no_speech)
            ids |= set(range(tok.timestamp_begin, self.dims.n_vocab))
            ids |= set(tok.all_language_tokens)
            self._suppress[key] = torch.tensor(sorted(i for i in ids if i < self.dims.n_vocab), device=self.device)
        return self._suppress[key]

    # -- words ----------------------------------------------------------------
    def _segments(self, row: _Row, weights: torch.Tensor | None) -> list[Segment]:
        tok = row.tokenizer
        text = [t for t in row.tokens if t < tok.eot]
        if not text:
            return []
        words, word_tokens = tok.split_to_word_tokens(text + [tok.eot])
        words, word_tokens = words[:-1], word_tokens[:-1]
        starts, ends = self._word_times(weights, word_tokens, row.frames)
        timed = _merge_punctuation([Word(s, e, w) for w, s, e in zip(words, starts, ends)])
        return _sentences(timed)

    def _word_times(self, weights, word_tokens: list[list[int]], frames: int) -> tuple[list[float], list[float]]:
        n = sum(len(t) for t in word_tokens)
        if weights is None or frames < 8 or weights.shape[1] < n + 1:
            span = frames / TOKENS_PER_SECOND
            edges = np.linspace(0.0, span, len(word_tokens) + 1)
            return edges[:-1].tolist(), edges[1:].tolist()
        w = weights[:, : n + 1].float().softmax(dim=-1)
        std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
        w = median_filter((w - mean) / (std + 1e-8), 7)
        matrix = w.mean(dim=0)
        text_idx, time_idx = dtw(-matrix.double().cpu())
        jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
        jump_times = time_idx[jumps] / TOKENS_PER_SECOND
        bounds = np.cumsum([0] + [len(t) for t in word_tokens])
        bounds = np.minimum(bounds, len(jump_times) - 1)
        starts = jump_times[bounds[:-1]]
        ends = np.maximum(jump_times[bounds[1:]], starts + 0.02)
        return starts.tolist(), ends.tolist()


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _merge_punctuation(words: list[Word]) -> list[Word]:
    """A word that is only punctuation joins the word before it (as openai-whisper's merge does)."""
    out: list[Word] = []
    for w in words:
        if out and w.text.strip() and all(c in string.punctuation for c in w.text.strip()) and not w.text.startswith(" "):
            prev = out[-1]
            out[-1] = Word(prev.start, max(prev.end, w.start), prev.text + w.text)
        else:
            out.append(w)
    return out


def _sentences(words: list[Word]) -> list[Segment]:
    """Without timestamp tokens, a segment is a sentence: it ends at a word ending in . ? or !"""
    segments, current = [], []
    for w in words:
        current.append(w)
        if w.text.rstrip().endswith(SENTENCE_END):
            segments.append(Segment(current[0].start, current[-1].end, tuple(current)))
            current = []
    if current:
        segments.append(Segment(current[0].start, current[-1].end, tuple(current)))
    return segments
