"""Beam search for a stream's last decode of an utterance.

While a stream runs, a greedy decode is checked by the next one: LocalAgreement commits only what
two consecutive hypotheses agree on, AlignAtt only what its attention has passed. The decode at the
end of an utterance has no such second look: what it says is committed as it is. Greedy decoding
there drops words it was unsure of (on a real father-and-child recording, "... things to say."
for "... things to say to it?", depending on where the buffer starts to within 50 ms; beam search
keeps them at every start). So that one decode searches `beam_size` hypotheses with
openai-whisper's own `BeamSearchDecoder` (its suppression and timestamp rules, the prompt and the
forced prefix as in our greedy loop), on the encoder output already computed for the batch.

The tokens it proposes then go through the engine's own acceptance rules, exactly as greedy tokens
do (a timestamp past the audio, AlignAtt's stop before the end and its rewind guard end the row),
and one teacher-forced decoder pass gives the alignment heads' attention for word times, where the
greedy loop captures it step by step. A search that fails openai-whisper's quality checks goes back
to the greedy loop and its temperature fallback.

Each search is a decode of its own that the scheduler's round waits for, so a round searches at
most `searches_per_round` last decodes (the engine's); more in the same round are decoded greedily,
as every decode was before.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import whisper

from .asr_types import TranscribeJob
from .decoder_step import most_attended

if TYPE_CHECKING:
    from .batched_whisper import BatchedWhisper, _Row

log = logging.getLogger("backends.final_search")

# The search ends once it holds beam_size x PATIENCE finished hypotheses (Kasai et al.'s patience
# factor, as openai-whisper implements it). At 1, hypotheses that end early fill that quota first:
# on a clean LibriSpeech sentence it stopped at "... behind the curtain on" (mean log-probability
# -0.99) before "... behind the curtain on the left." (-0.01) had finished.
PATIENCE = 2.0


def searchable(engine: BatchedWhisper, job: TranscribeJob, window: int) -> bool:
    """openai-whisper's decoder takes encoder output only for full 30-s windows (the default)."""
    return (job.final and engine.beam_size > 1 and window == engine.dims.n_audio_ctx
            and not engine.force_tokens_per_second)


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
    row = engine._rows([job], encoded, [window], [frames])[0]
    tok = row.tokenizer
    context = row.context
    prompt = context[1:row.sot_index] if row.sot_index > 0 else None
    head = row.sot_index + len(tok.sot_sequence) + (0 if row.timestamps else 1)
    options = whisper.DecodingOptions(
        task="transcribe", language=tok.language or "en", beam_size=engine.beam_size, patience=PATIENCE, prompt=prompt,
        prefix=context[head:] or None, without_timestamps=not row.timestamps, fp16=engine.fp16,
    )
    result = whisper.decode(engine.model, encoded[:, : engine.dims.n_audio_ctx], options)[0]
    weights = _forced_attention(engine, row, encoded, list(result.tokens))
    heard = [0] if weights is None else most_attended(
        weights[0].transpose(0, 1), torch.arange(weights.shape[-1], device=weights.device)[None, None] < window).tolist()
    proposed = list(result.tokens) + [tok.eot]
    for j, token in enumerate(proposed):
        if not engine._accept(row, token, heard[min(j, len(heard) - 1)], 0.0, tok.eot):
            break
    row.sum_logprob = result.avg_logprob * (len(result.tokens) + 1)
    row.no_speech = result.no_speech_prob
    if weights is None:
        return row, None
    return row, engine._alignment(weights[:, :, : len(row.tokens) + 1], [row])[0]


def _forced_attention(engine: BatchedWhisper, row: _Row, encoded: torch.Tensor,
                      tokens: list[int]) -> torch.Tensor | None:
    """The alignment heads' raw cross-attention scores at the positions that predict each of
    `tokens` and the end after them, [1, H, len(tokens) + 1, T]: one causal pass over context + tokens
    (the greedy loop captures the same scores step by step)."""
    if not engine._align:
        return None
    dims, dev = engine.dims, engine.device
    sequence = row.context + tokens
    n = len(sequence)
    heads = dims.n_text_head
    cache = [(torch.zeros(1, heads, n, dims.n_text_state // heads, dtype=engine.dtype, device=dev),
              torch.zeros(1, heads, n, dims.n_text_state // heads, dtype=engine.dtype, device=dev))
             for _ in range(dims.n_text_layer)]
    causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()[None, None]
    ids = torch.tensor([sequence], device=dev)
    positions = torch.arange(n, device=dev)[None]
    cross = engine._cross_kv(encoded)
    _, attn, _ = engine._forward(ids, positions, (cache, 0, causal), cross,
                                 engine._cross_mask([row.window], encoded), True)
    return attn[:, :, len(row.context) - 1:]

