"""Beam search for a stream's last decode of an utterance.

While a stream runs, a greedy decode is checked by the next one: LocalAgreement commits only what
two consecutive hypotheses agree on, AlignAtt only what its attention has passed. The decode at the
end of an utterance has no such second look: what it says is committed as it is. Greedy decoding
there drops words it was unsure of (on a real father-and-child recording, "... things to say."
for "... things to say to it?", with the committed text as the prompt; beam search keeps them).
So that one decode searches `beam_size` hypotheses the way openai-whisper's `BeamSearchDecoder`
does (each hypothesis's `beam_size + 1` best next tokens, the best `beam_size` unfinished ones go
on; it ends once `beam_size x PATIENCE` have finished; the best by mean log-probability wins), with
the same suppression and timestamp rules, prompt and forced prefix as the greedy loop.

It runs on the engine's own decoder step (`DecoderStep.logprobs`): the hypotheses are the rows of
one batch, prefilled once, their self-attention cache reordered as they branch, and their shared
audio attended as one row. On a 2-core CPU a 10-s buffer's search takes 0.9-1.0 s against 0.6 s
greedy (openai-whisper's own `decode`, with its hooks and concatenated caches: 2.2 s). The alignment
heads' attention is kept per step, as the greedy loop keeps it, for the word times. The tokens it
finds then go through the engine's own acceptance rules, exactly as greedy tokens do (a timestamp past the audio, AlignAtt's stop before
the end and its rewind guard end the row). A search that fails openai-whisper's quality checks
goes back to the greedy loop and its temperature fallback.

Each search is a decode of its own that the scheduler's round waits for, so a round searches at
most `searches_per_round` last decodes (the engine's); more in the same round are decoded greedily.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .asr_types import TranscribeJob

if TYPE_CHECKING:
    from .batched_whisper import BatchedWhisper, _Row

log = logging.getLogger("backends.final_search")

# The search ends once it holds beam_size x PATIENCE finished hypotheses (Kasai et al.'s patience
# factor, as openai-whisper implements it). At 1, hypotheses that end early fill that quota first:
# on a clean LibriSpeech sentence it stopped at "... behind the curtain on" (mean log-probability
# -0.99) before "... behind the curtain on the left." (-0.01) had finished.
PATIENCE = 2.0


def searchable(engine: BatchedWhisper, job: TranscribeJob) -> bool:
    return job.final and engine.beam_size > 1 and not engine.force_tokens_per_second


def search(engine: BatchedWhisper, job: TranscribeJob, encoded: torch.Tensor, window: int,
           frames: int) -> tuple[_Row, torch.Tensor | None] | None:
    """The row of `job` decoded by beam search, and its alignment matrix (as `_decode` gives);
    None when the device has no memory for the beams (the greedy loop decodes it then).
    `encoded`: this job's encoder output, [1, T, d]."""
    try:
        return _search(engine, job, encoded, window, frames)
    except torch.cuda.OutOfMemoryError:
        log.warning("no GPU memory for a beam search: the utterance's last decode is greedy")
        return None


def _search(engine: BatchedWhisper, job: TranscribeJob, encoded: torch.Tensor, window: int,
            frames: int) -> tuple[_Row, torch.Tensor | None]:
    K = engine.beam_size
    T = encoded.shape[1]
    row = engine._rows([job], encoded, [window], [frames])[0]
    buf, stepper, _, logp, attn = engine._prefill([row], encoded, graphs=False, room=K)
    _copy_first_row(buf, K, len(row.context))
    stepper.shared_audio = True
    tok = row.tokenizer
    eot, limit = tok.eot, min(row.max_new, buf.text_ctx - len(row.context) - 1)
    in_window = buf.cross_ok[:K, 0, :, :T]
    heard = engine._attended(attn, in_window)
    attns = [attn[:, :, -1:] if attn is not None else None]  # per step: each row's attention [rows, H, 1, T]
    beams = [_Beam([], 0.0, [])]  # every row holds the same forced tokens: one hypothesis at first
    finished: dict[tuple[int, ...], _Beam] = {}
    wanted = round(K * PATIENCE)
    for step in range(limit + 1):
        lps, ids = (t.tolist() for t in logp[:len(beams)].topk(K + 1, dim=-1))
        at = heard[:len(beams)].tolist()
        candidates = sorted(((b.total + lp, b, t, i) for i, b in enumerate(beams) for lp, t in zip(lps[i], ids[i])),
                            key=lambda c: -c[0])
        going, sources = [], []
        for total, b, token, i in candidates:
            grown = _Beam(b.tokens + [token], total, b.steps + [(step, i, at[i])])
            if token == eot:
                if len(finished) < wanted:
                    finished.setdefault(tuple(grown.tokens), grown)
            else:
                going.append(grown)
                sources.append(i)
                if len(going) == K:
                    break
        if len(finished) >= wanted or not going or step == limit:
            break
        nxt = torch.tensor([b.tokens[-1] for b in going], device=engine.device)
        if step:
            _reorder(buf, sources, int(buf.slot) + 1)
            stepper.advance(len(going), nxt)
        else:  # the token after the forced ones goes where the prefill left the slot
            took = nxt >= tok.timestamp_begin
            buf.token[:len(going), 0] = nxt
            buf.last_ts[:len(going)] = took
            buf.ts_max[:len(going)] = torch.where(took, nxt, buf.ts_max[:len(going)])
        beams = going
        logp = stepper.logprobs(len(beams), T)
        heard = buf.heard
        attns.append(buf.attn[:len(beams), :, :, :T].clone() if attn is not None else None)
    pool = list(finished.values())
    if len(pool) < K:  # openai-whisper's finalize: the best unfinished hypotheses, as if they ended here
        at = heard[:len(beams)].tolist()
        for i, b in sorted(enumerate(beams), key=lambda x: -x[1].total)[:K - len(pool)]:
            pool.append(_Beam(b.tokens + [eot], b.total, b.steps + [(len(attns) - 1, i, at[i])]))
    best = max(pool, key=lambda b: b.total / max(1, len(b.tokens) - 1))
    for token, (_, _, position) in zip(best.tokens, best.steps):
        if not engine._accept(row, token, position, 0.0, eot):
            break
    row.sum_logprob = best.total
    if attn is None:
        return row, None
    weights = torch.cat([attns[s][i] for s, i, _ in best.steps], dim=1)[None]
    return row, engine._alignment(weights[:, :, : len(row.tokens) + 1], [row])[0]


@dataclass
class _Beam:
    """One hypothesis: its new tokens, their summed log-probability, and for each token the step,
    the row that predicted it, and the audio position that row attended to most."""

    tokens: list[int]
    total: float
    steps: list[tuple[int, int, int]]


def _copy_first_row(buf, rows: int, slots: int) -> None:
    """Rows 1.. start as row 0, prefilled alone: its forced tokens' cache, its masks and timestamp
    state (the audio's cross keys/values stay in row 0 only: `DecoderStep.shared_audio`)."""
    for cache in (*buf.self_k, *buf.self_v):
        cache[1:rows, :, :slots] = cache[:1, :, :slots]
    for state in (buf.key_ok, buf.cross_ok, buf.ts_mode, buf.last_ts, buf.pen_ts, buf.ts_max, buf.pos, buf.token,
                  buf.temp):
        state[1:rows] = state[:1]


def _reorder(buf, sources: list[int], slots: int) -> None:
    """Row k of the batch continues hypothesis `sources[k]`: its cache (the first `slots` slots)
    and its timestamp state are copied from that row."""
    idx = torch.tensor(sources, device=buf.token.device)
    m = len(sources)
    for cache in (*buf.self_k, *buf.self_v):
        cache[:m, :, :slots] = cache[idx, :, :slots]
    for state in (buf.last_ts, buf.pen_ts, buf.ts_max, buf.pos):
        state[:m] = state[idx]
