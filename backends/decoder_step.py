"""One greedy decoder step for a batch of streams, over preallocated buffers, eager or as a CUDA graph.

A decoder step for one new token is tiny arithmetic wrapped in ~200 kernel
launches; at small batch the launches are the cost. So the step reads and
writes only fixed buffers (`StepBuffers`): the self-attention cache is written
at a slot held in a device tensor, the attention masks are derived from that
slot on the device, and the step feeds itself (its chosen token becomes the
next step's input, position and slot advance by one). With fixed shapes and no
host values the step can be captured once per batch size as a CUDA graph and
replayed for every token of every round; on the CPU it simply runs.

The engine (`BatchedWhisper`) fills the buffers for a round (prefill writes the
prompt's keys/values into the cache, the encoder's cross keys/values are copied
in), then calls `step()` until every row is done, reading back two small
vectors per step: each row's next token and the audio position it attended to.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import whisper

log = logging.getLogger("backends.decoder_step")


class StepBuffers:
    """Everything one decoding round keeps on the device, for up to `rows` streams."""

    def __init__(self, model: whisper.model.Whisper, rows: int, audio_ctx: int, n_align: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        d = model.dims
        heads, dh, S = d.n_text_head, d.n_text_state // d.n_text_head, d.n_text_ctx
        self.rows, self.text_ctx, self.audio_ctx = rows, S, audio_ctx

        def zeros(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)

        self.self_k = [zeros(rows, heads, S, dh) for _ in range(d.n_text_layer)]
        self.self_v = [zeros(rows, heads, S, dh) for _ in range(d.n_text_layer)]
        self.cross_k = [zeros(rows, heads, audio_ctx, dh) for _ in range(d.n_text_layer)]
        self.cross_v = [zeros(rows, heads, audio_ctx, dh) for _ in range(d.n_text_layer)]
        self.key_ok = zeros(rows, S, dt=torch.bool)  # self-attention keys a row may see (not its left padding)
        self.cross_ok = zeros(rows, 1, 1, audio_ctx, dt=torch.bool)  # its window's audio positions
        self.token = zeros(rows, 1, dt=torch.long)
        self.pos = zeros(rows, 1, dt=torch.long)
        self.slot = zeros(1, dt=torch.long)
        self.suppress = zeros(d.n_vocab, dt=torch.float32)  # 0 or -inf, added to the logits
        self.temp = zeros(rows, dt=torch.float32)  # each row's sampling temperature (0: greedy)
        self.logprob = zeros(rows, dt=torch.float32)  # log-probability of the token picked
        # Timestamp rules (openai-whisper's ApplyTimestampRules), per row: whether the row decodes with
        # timestamps, whether its last / last-but-one token was one, and the last timestamp taken.
        self.ts_mode = zeros(rows, dt=torch.bool)
        self.last_ts = zeros(rows, dt=torch.bool)
        self.pen_ts = zeros(rows, dt=torch.bool)
        self.ts_max = zeros(rows, dt=torch.long)
        self.next = zeros(rows, dt=torch.long)
        self.heard = zeros(rows, dt=torch.long)
        self.attn = zeros(rows, max(n_align, 1), 1, audio_ctx, dt=torch.float32)
        self.slots = torch.arange(S, device=device)

    def timestamp_state(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows [0, n)'s timestamp-rule state as `timestamp_rules` and `greedy_pick` take it, [n, 1] each."""
        return self.ts_mode[:n, None], self.last_ts[:n, None], self.pen_ts[:n, None], self.ts_max[:n, None]

    def nbytes(self) -> int:
        tensors = [*self.self_k, *self.self_v, *self.cross_k, *self.cross_v, self.attn]
        return sum(t.numel() * t.element_size() for t in tensors)


class VocabularyProjection:
    """Decoder states onto the vocabulary: logits [n, vocab] of states [n, d].

    The product reads the whole embedding matrix (51,864 rows) every step: on the CPU it is
    memory-bound, the largest single cost of a decoder step (3 ms of tiny's ~10 ms for one row in
    float32). There it runs on int8 weights (one scale per token, fbgemm's dynamic int8 product:
    a quarter of the bytes, 0.8 ms for one row, 2 ms for eight against 6-11 ms), and the
    `EXACT_CANDIDATES` tokens it scores highest are scored again exactly in float32: the token a
    greedy step takes, and the best text token the timestamp rules compare against, are those of
    the float32 product; only the many unlikely tokens carry the int8 error (about 1 % of a logit),
    which moves their share of a log-softmax by far less than any threshold. `quantized=False` (and
    CUDA, where the product is not the bottleneck) keeps the float32 product: for one row x @ Wt
    with Wt stored [d, vocab] (2.5x faster than the embedding's own layout), for more W @ x.T."""

    EXACT_CANDIDATES = 16

    def __init__(self, embedding: torch.Tensor, by_column: torch.Tensor | None, quantized: bool = False) -> None:
        self.embedding = embedding  # [vocab, d]
        self.by_column = by_column  # [d, vocab] contiguous, or None (CUDA; the CPU's int8 product)
        self._packed = _int8_rows(embedding) if quantized else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and bool(torch.isfinite(x).all()):  # int8 needs a finite range
            return self._int8_then_exact(x)
        if self.by_column is None:
            return x @ self.embedding.T.to(x.dtype)
        if x.shape[0] == 1:
            return x @ self.by_column
        return (self.embedding @ x.T).T

    def _int8_then_exact(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        logits = torch.ops.quantized.linear_dynamic(x, self._packed)
        top = logits.topk(self.EXACT_CANDIDATES, dim=-1).indices  # [n, k]
        exact = torch.einsum("nd,nkd->nk", x, self.embedding[top].float())
        return logits.scatter_(-1, top, exact)


def int8_supported(device: torch.device) -> bool:
    """fbgemm's int8 products exist on this build and device (x86 CPUs)."""
    return device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines


def _int8_rows(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] as fbgemm's packed int8 operand, one scale per output row."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).double()
    zeros = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated as a public type, not the kernels
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


class DecoderStep:
    """Runs the decoder step on `StepBuffers` for the first `n` rows; on CUDA, one graph per `n`."""

    def __init__(self, model: whisper.model.Whisper, buffers: StepBuffers, align: list[tuple[int, int]],
                 use_graphs: bool, vocabulary: VocabularyProjection, eot: int, timestamp_begin: int,
                 generator: torch.Generator | None = None) -> None:
        self.model, self.buf, self.align = model, buffers, align
        self.eot, self.timestamp_begin = eot, timestamp_begin
        self.vocabulary = vocabulary
        self.align_heads: dict[int, list[int]] = {}  # per layer: the heads whose attention times words
        for layer, head in align:
            self.align_heads.setdefault(layer, []).append(head)
        self.use_graphs = use_graphs
        self.sampling = False  # some row has a temperature: draw noise (a separate graph)
        # Where eager steps draw their noise (the engine's own generator); None for captured graphs,
        # which draw from the device's default one, the generator CUDA graphs know how to replay.
        self.generator = None if use_graphs else generator
        self.shared_audio = False  # every row decodes row 0's audio (eager steps only)
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self._pool = None

    def step(self, n: int, t: int) -> None:
        """Advance rows [0, n) by one token, attending to `t` audio positions (results in
        buf.next / buf.heard / buf.attn)."""
        self.prepare(n, t)
        if self.use_graphs:
            self.graphs[n, t, self.sampling].replay()
        else:
            self._body(n, t)

    def prepare(self, n: int, t: int) -> None:
        """Capture the graph for (`n` rows, `t` audio positions) if needed. Call before the buffers
        are filled for a round (warm-up scribbles on them). A failed capture falls back to eager steps."""
        if self.use_graphs and (n, t, self.sampling) not in self.graphs:
            try:
                self.graphs[n, t, self.sampling] = self._capture(n, t)
            except RuntimeError as exc:
                log.warning("CUDA graph capture failed (%s); decoding eagerly", exc)
                self.use_graphs = False

    def batch_size(self, rows: int) -> int:
        """The batch a round of `rows` streams runs at: a power of two (so few graphs are captured)."""
        if not self.use_graphs:
            return rows
        return min(self.buf.rows, 1 << max(0, math.ceil(math.log2(max(rows, 1)))))

    # -- internals --------------------------------------------------------
    def _capture(self, n: int, t: int) -> torch.cuda.CUDAGraph:
        """Warm the step up on a side stream, then record it. Warm-up scribbles on the buffers, so
        the engine captures before it fills them for a round."""
        saved = (self.buf.token.clone(), self.buf.pos.clone(), self.buf.slot.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(n, t)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._body(n, t)
        self._pool = graph.pool()
        for t, v in zip((self.buf.token, self.buf.pos, self.buf.slot), saved):
            t.copy_(v)
        return graph

    def _body(self, n: int, t: int) -> None:
        b = self.buf
        if self.sampling:
            logp = self.logprobs(n, t)
            nxt = pick(logp, b.temp[:n], self.sampling, self.generator)
            b.logprob[:n].copy_(logp.gather(1, nxt[:, None])[:, 0])
        else:
            nxt, logprob = greedy_pick(self.logits(n, t), *b.timestamp_state(n), self.eot, self.timestamp_begin)
            b.logprob[:n].copy_(logprob)
        self.advance(n, nxt)

    def advance(self, n: int, nxt: torch.Tensor) -> None:
        """Rows [0, n) take tokens `nxt`: the timestamp rules' state follows, and they are the next
        step's input, one position and one cache slot on."""
        b = self.buf
        took_ts = nxt >= self.timestamp_begin
        b.pen_ts[:n].copy_(b.last_ts[:n])
        b.last_ts[:n].copy_(took_ts)
        b.ts_max[:n].copy_(torch.where(took_ts, nxt, b.ts_max[:n]))
        b.next[:n].copy_(nxt)
        b.token[:n, 0].copy_(nxt)
        b.pos[:n] += 1
        b.slot += 1

    def logits(self, n: int, t: int) -> torch.Tensor:
        """The next token's logits for rows [0, n) [n, vocab], suppressed tokens at -inf; the
        alignment heads' attention of this step goes to buf.attn / buf.heard."""
        b = self.buf
        pos = b.pos[:n].clamp(max=b.text_ctx - 1)
        # A graph needs fixed shapes, so it attends over every cache slot (masked); an eager step on
        # the CPU, where reading the slot costs nothing, attends only over the slots written so far.
        upto = int(b.slot) + 1 if not self.use_graphs and b.slot.device.type == "cpu" else b.text_ctx
        visible = (b.key_ok[:n, :upto] & (b.slots[None, :upto] <= b.slot))[:, None, None, :]
        x, attn = self._layers(n, t, b.token[:n], pos, b.slot, visible)
        logits = self.vocabulary(x[:, -1]).float() + b.suppress
        if attn is not None:
            b.attn[:n, :, :, :t].copy_(attn)
            b.heard[:n].copy_(most_attended(attn[:, :, -1], b.cross_ok[:n, 0, :, :t]))
        return logits

    def logprobs(self, n: int, t: int) -> torch.Tensor:
        """The next token's log-probabilities for rows [0, n) [n, vocab], after suppression and the
        timestamp rules; the alignment heads' attention of this step goes to buf.attn / buf.heard."""
        return timestamp_rules(self.logits(n, t), *self.buf.timestamp_state(n), self.eot, self.timestamp_begin)

    def verify(self, n: int, t: int, drafts: torch.Tensor, lengths: torch.Tensor) -> Verified:
        """Greedy steps for rows [0, n) along drafted text tokens, in one pass (eager, greedy rows).

        Row i's input is its current token followed by `drafts[i, :lengths[i]]` (text tokens of a
        decode of the same audio a moment ago); the pass writes all of them into the cache at once
        and reads the next-token log-probabilities after each, under the same suppression and
        timestamp rules a step applies. A drafted token is taken where it is the one a step would
        have picked there, up to the first that is not; after the taken tokens, the token the step
        picks at the first disagreement (or after the whole draft) is taken too, so a row advances
        by `accepted + 1` tokens, as many steps' worth for the price of one pass. Cache slots of the
        tokens not taken are masked out for that row (its positions stay consecutive), and every
        buffer is left as that many steps would have left it."""
        assert not self.shared_audio
        b, dev = self.buf, self.buf.token.device
        K = drafts.shape[1]
        q = torch.arange(K + 1, device=dev)
        tokens = torch.cat([b.token[:n], drafts], dim=1)  # [n, K+1]
        pos = (b.pos[:n] + q[None, :]).clamp(max=b.text_ctx - 1)
        slot = int(b.slot)
        upto = slot + K + 1
        inside = q[None, :] <= lengths[:, None]  # [n, K+1]: the current token and the row's draft
        b.key_ok[:n, slot:upto] = inside
        visible = (b.key_ok[:n, None, :upto] & (b.slots[None, None, :upto] <= slot + q[None, :, None]))[:, None]
        x, attn = self._layers(n, t, tokens, pos, slot + q, visible)
        # The timestamp rules' state before each position's prediction: after the current token as
        # the buffers hold it, then after each drafted text token.
        is_ts = tokens >= self.timestamp_begin
        last = torch.cat([b.last_ts[:n, None], is_ts[:, 1:]], dim=1)
        pen = torch.cat([b.pen_ts[:n, None], last[:, :-1]], dim=1)
        # Only the positions of each row's own draft are scored (rows' drafts differ in length: the
        # vocabulary product and the pick are most of a pass).
        at = inside.reshape(-1).nonzero()[:, 0]
        mode = b.ts_mode[:n, None].expand(n, K + 1).reshape(-1, 1)[at]
        top = b.ts_max[:n, None].expand(n, K + 1).reshape(-1, 1)[at]
        logits = self.vocabulary(x.reshape(n * (K + 1), -1)[at]).float() + b.suppress
        found, found_logprob = greedy_pick(logits, mode, last.reshape(-1, 1)[at], pen.reshape(-1, 1)[at], top,
                                           self.eot, self.timestamp_begin)
        picks = torch.full((n * (K + 1),), -1, dtype=torch.long, device=dev).index_copy_(0, at, found).view(n, K + 1)
        logprob = torch.zeros(n * (K + 1), device=dev).index_copy_(0, at, found_logprob).view(n, K + 1)
        agree = (picks[:, :K] == drafts) & inside[:, 1:]
        accepted = agree.int().cumprod(1).sum(1)  # [n]
        heard = torch.zeros_like(picks)
        if attn is not None:
            heard = most_attended(attn.transpose(1, 2).reshape(n * (K + 1), attn.shape[1], t),
                                  b.cross_ok[:n, :, :, :t].repeat_interleave(K + 1, 0)[:, 0]).view(n, K + 1)
        # Leave the buffers as `accepted + 1` steps would: the slots not taken are masked out.
        b.key_ok[:n, slot:upto] &= q[None, :] <= accepted[:, None]
        nxt = picks.gather(1, accepted[:, None])[:, 0]
        before = tokens.gather(1, accepted[:, None])[:, 0]
        took_ts = nxt >= self.timestamp_begin
        b.pen_ts[:n].copy_(before >= self.timestamp_begin)
        b.last_ts[:n].copy_(took_ts)
        b.ts_max[:n].copy_(torch.where(took_ts, nxt, b.ts_max[:n]))
        b.next[:n].copy_(nxt)
        b.token[:n, 0].copy_(nxt)
        b.pos[:n] += accepted[:, None] + 1
        b.slot.fill_(upto)
        return Verified(picks, logprob, heard, attn, accepted)

    def _layers(self, n: int, t: int, tokens: torch.Tensor, pos: torch.Tensor, write: torch.Tensor,
                visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's blocks over `tokens` [n, q] at positions `pos`, their keys/values written to
        the cache at slots `write` ([1] or [q]), self-attention over the slots `visible` allows.
        Returns the final states [n, q, d] and the alignment heads' scores [n, H, q, t] (or None)."""
        b, dec = self.buf, self.model.decoder
        heads = self.model.dims.n_text_head
        x = (dec.token_embedding(tokens) + dec.positional_embedding[pos]).to(b.self_k[0].dtype)
        upto = visible.shape[-1]
        captured = []
        for layer, block in enumerate(dec.blocks):
            h = block.attn_ln(x)
            q = split_heads(block.attn.query(h), heads)
            b.self_k[layer][:n].index_copy_(2, write, split_heads(block.attn.key(h), heads))
            b.self_v[layer][:n].index_copy_(2, write, split_heads(block.attn.value(h), heads))
            kc, vc = b.self_k[layer][:n, :, :upto], b.self_v[layer][:n, :, :upto]
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=visible)
            x = x + block.attn.out(merge_heads(a))
            h = block.cross_attn_ln(x)
            q = split_heads(block.cross_attn.query(h), heads)
            # Rows that hear the same audio (a beam search's hypotheses) attend to it as one row
            # with n queries: its keys/values are read once, not n times.
            rows = 1 if self.shared_audio else n
            if self.shared_audio:
                q = q.transpose(0, 2)  # [n, H, 1, dh] -> [1, H, n, dh]
            kx, vx = b.cross_k[layer][:rows, :, :t], b.cross_v[layer][:rows, :, :t]
            a = F.scaled_dot_product_attention(q, kx, vx, attn_mask=b.cross_ok[:rows, :, :, :t])
            for hd in self.align_heads.get(layer, ()):  # slices are views: no copy of the keys
                qk = q[:, hd:hd + 1] @ kx[:, hd:hd + 1].transpose(-1, -2)
                captured.append((qk.transpose(0, 2) if self.shared_audio else qk).float() * q.shape[-1] ** -0.5)
            if self.shared_audio:
                a = a.transpose(0, 2)
            x = x + block.cross_attn.out(merge_heads(a))
            x = x + block.mlp(block.mlp_ln(x))
        return dec.ln(x), (torch.cat(captured, dim=1) if captured else None)


@dataclass
class Verified:
    """What `DecoderStep.verify` found, per row and position [n, K+1]: the token a greedy step picks
    there, its log-probability, the audio position it attended to (the alignment heads' scores
    [n, H, K+1, t] too, or None), and how many drafted tokens were taken [n]."""

    picks: torch.Tensor
    logprob: torch.Tensor
    heard: torch.Tensor
    attn: torch.Tensor | None
    accepted: torch.Tensor


def timestamp_rules(logits: torch.Tensor, mode: torch.Tensor, last: torch.Tensor, pen: torch.Tensor,
                    top: torch.Tensor, eot: int, timestamp_begin: int, first: bool = False,
                    max_initial: int = 50) -> torch.Tensor:
    """Log-probabilities [R, vocab] after openai-whisper's timestamp rules (fixed shapes, no host
    sync), given each row's state [R, 1]: whether it decodes with timestamps (`mode`), whether its
    last / last-but-one token was one, and the last timestamp taken (`top`). Rows with timestamps:
    they come in pairs (after a lone timestamp, another or the end; after a pair, text), never go
    back, and are taken whenever their total probability beats every text token; the first token
    is a timestamp of at most `max_initial` (1 s). Rows without timestamps never take one."""
    ids = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    is_ts = ids >= timestamp_begin
    if first:
        mask = ~mode & is_ts | mode & ((ids < timestamp_begin) | (ids > timestamp_begin + max_initial))
    else:
        floor = torch.where(last & ~pen, top, top + 1)
        mask = (~mode & is_ts) | mode & ((last & ~pen & (ids < eot)) | (last & pen & is_ts)
                                         | (is_ts & (ids < floor) & (top >= timestamp_begin)))
    logp = logits.masked_fill(mask, -math.inf).log_softmax(-1)
    ts_mass = logp[:, timestamp_begin:].logsumexp(-1, keepdim=True)
    best_text = logp[:, :timestamp_begin].max(-1, keepdim=True).values
    force = mode & (ts_mass > best_text)
    return logp.masked_fill(force & (ids < timestamp_begin), -math.inf).log_softmax(-1)


def greedy_pick(logits: torch.Tensor, mode: torch.Tensor, last: torch.Tensor, pen: torch.Tensor,
                top: torch.Tensor, eot: int, timestamp_begin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token a greedy step takes under `timestamp_rules` (after the first token) and its
    log-probability, [R] each, without building the rules' [R, vocab] masks and two log-softmaxes:
    the rules only ever allow or forbid whole groups (text, end of text and specials, timestamps
    from a floor), so each group's maximum and log-sum-exp decide. Six passes over the vocabulary
    became two; with many rows (a pass over a draft) they were most of its cost."""
    text, special, ts = logits[:, :eot], logits[:, eot:timestamp_begin], logits[:, timestamp_begin:]
    ts_ids = torch.arange(ts.shape[1], device=logits.device)[None, :] + timestamp_begin
    lone = last & ~pen
    floor = torch.where(lone, top, top + 1)
    ts_banned = ~mode | (last & pen) | ((ts_ids < floor) & (top >= timestamp_begin))
    ts = ts.masked_fill(ts_banned, -math.inf)
    no_text = mode & lone
    text_max, text_arg = text.max(-1, keepdim=True)
    text_max = text_max.masked_fill(no_text, -math.inf)
    text_lse = text.logsumexp(-1, keepdim=True).masked_fill(no_text, -math.inf)
    special_max, special_arg = special.max(-1, keepdim=True)
    special_lse = special.logsumexp(-1, keepdim=True)
    ts_max, ts_arg = ts.max(-1, keepdim=True)
    ts_lse = ts.logsumexp(-1, keepdim=True)
    total = torch.logaddexp(torch.logaddexp(text_lse, special_lse), ts_lse)
    # Timestamps are taken whenever their total probability beats every other token's.
    force = mode & (ts_lse > torch.maximum(text_max, special_max))
    best = torch.where(text_max >= special_max, text_arg, special_arg + eot)
    best_max = torch.maximum(text_max, special_max)
    take_ts = force | (ts_max > best_max)
    token = torch.where(take_ts, ts_arg + timestamp_begin, best)
    logprob = torch.where(force, ts_max - ts_lse, torch.where(take_ts, ts_max, best_max) - total)
    return token[:, 0], logprob[:, 0]


def most_attended(scores: torch.Tensor, in_window: torch.Tensor) -> torch.Tensor:
    """The window position each query attends to most: the alignment heads' cross-attention scores
    [R, H, T], softmax over the positions `in_window` ([R or 1, 1, T]), averaged over heads -> [R]."""
    return scores.masked_fill(~in_window, -math.inf).softmax(-1).mean(1).argmax(-1)


def pick(logp: torch.Tensor, temperature: torch.Tensor, sampling: bool,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row's next token: the most likely one, or where the row's temperature is above 0 a
    draw from softmax(logp / T) (Gumbel-max: fixed shapes and no host sync, so a graph can hold it)."""
    if not sampling:
        return logp.argmax(-1)
    uniform = torch.rand(logp.shape, generator=generator, device=logp.device, dtype=logp.dtype)
    gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-20)))
    hot = temperature > 0
    scores = torch.where(hot[:, None], logp / temperature.clamp(min=1e-6)[:, None] + gumbel, logp)
    return scores.argmax(-1)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    bsz, n, d = x.shape
    return x.view(bsz, n, heads, d // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    bsz, h, n, d = x.shape
    return x.transpose(1, 2).reshape(bsz, n, h * d)
