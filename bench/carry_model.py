"""Shrink a Whisper checkpoint to carry it to a machine with no network, and restore it there.

    python bench/carry_model.py pack  tiny.en.pt  tiny.en.int8.safetensors
    python bench/carry_model.py unpack tiny.en.int8.safetensors tiny.en.pt

The lent GPU machine takes at most 64 MB per call and cannot download weights.
`pack` stores every large matrix as int8 with one fp16 scale per row (absmax), the
rest as fp16: tiny.en goes from 75 MB to about 39 MB. `unpack` writes an
openai-whisper fp16 checkpoint that `--model PATH` loads. Rounding to int8 moves
each weight by at most half a step of its row's scale; the transcripts of the
bench speech stay the same (checked with bench/capacity.py on both).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def pack(src: Path, dst: Path) -> None:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in ckpt["model_state_dict"].items():
        t = t.float()
        if t.ndim >= 2 and t.numel() >= 4096:
            rows = t.reshape(t.shape[0], -1)
            scale = rows.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            tensors[name + ".q"] = torch.round(rows / scale[:, None]).to(torch.int8).reshape(t.shape)
            tensors[name + ".scale"] = scale.half()
        else:
            tensors[name] = t.half()
    heads = ckpt.get("alignment_heads")
    meta = {"dims": json.dumps(ckpt["dims"]), "alignment_heads": json.dumps(heads if heads is not None else None)}
    save_file(tensors, str(dst), metadata=meta)


def unpack(src: Path, dst: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    state = {}
    for name, t in tensors.items():
        if name.endswith(".scale"):
            continue
        if name.endswith(".q"):
            base = name[:-2]
            scale = tensors[base + ".scale"].float()
            rows = t.float().reshape(t.shape[0], -1) * scale[:, None]
            state[base] = rows.reshape(t.shape).half()
        else:
            state[name] = t
    ckpt = {"dims": json.loads(meta["dims"]), "model_state_dict": state}
    heads = json.loads(meta.get("alignment_heads", "null"))
    if heads is not None:
        ckpt["alignment_heads"] = heads
    torch.save(ckpt, dst)


if __name__ == "__main__":
    verb, a, b = sys.argv[1:4]
    {"pack": pack, "unpack": unpack}[verb](Path(a), Path(b))
