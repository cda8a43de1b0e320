"""Random-weight Whisper checkpoints of the real architectures.

The GPU machine has no network and a call carries at most 64 MB, so GPU tests
and benchmarks build a model of the right dimensions with random weights and
save it in openai-whisper's checkpoint format, which `--model PATH` loads.
Throughput is what they measure; the words are noise.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from whisper.model import ModelDimensions, Whisper

# openai-whisper's published dimensions (n_vocab 51864 for .en, 51865 multilingual).
DIMS = {
    "tiny": dict(n_audio_state=384, n_audio_head=6, n_audio_layer=4),
    "base": dict(n_audio_state=512, n_audio_head=8, n_audio_layer=6),
    "small": dict(n_audio_state=768, n_audio_head=12, n_audio_layer=12),
    "medium": dict(n_audio_state=1024, n_audio_head=16, n_audio_layer=24),
}


def dims_for(name: str) -> ModelDimensions:
    base = name.removesuffix(".en")
    d = DIMS[base]
    return ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=d["n_audio_state"], n_audio_head=d["n_audio_head"],
        n_audio_layer=d["n_audio_layer"], n_vocab=51864 if name.endswith(".en") else 51865, n_text_ctx=448,
        n_text_state=d["n_audio_state"], n_text_head=d["n_audio_head"], n_text_layer=d["n_audio_layer"],
    )


def random_model(name: str) -> Whisper:
    """A Whisper of `name`'s dimensions with random weights (from torch's global generator).
    openai-whisper leaves the decoder's positional embedding uninitialised (`torch.empty`: a trained
    checkpoint overwrites it); here it is drawn like the other weights, or a decode reads whatever
    the memory held (NaN logits in some runs and not in others)."""
    model = Whisper(dims_for(name))
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0.0, 0.02)
    return model


def save_random_whisper(name: str, path: Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint of `name`'s dimensions (fp16, as OpenAI ships them) to `path`."""
    torch.manual_seed(seed)
    dims = dims_for(name)
    model = random_model(name)
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"dims": asdict(dims), "model_state_dict": state}, path)
    return path


def decoded_rows(engine) -> list:
    """The rows `engine` (a `BatchedWhisper`) decodes from now on, as its text rules get them: random
    weights say random tokens, and which words survive those rules (none, if all are punctuation) is
    chance, so tests on random weights check the rows (their tokens, their language) instead."""
    rows: list = []
    real = engine._segments
    engine._segments = lambda row, matrix: rows.append(row) or real(row, matrix)
    return rows
