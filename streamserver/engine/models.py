"""How a device's models are built from the configuration (the runtime calls this on the worker)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from backends.vad import SileroVAD
from backends.batched_whisper import BatchedWhisper
from backends.whisper_loader import load_whisper
from gpu_manager import Device

from ..config import ServerConfig
from .runtime import DeviceModels, ModelLoader

log = logging.getLogger("streamserver.engine.models")


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def diarization_backend(config: ServerConfig) -> str | None:
    """The backend that will run: None without --diarization; `sortformer` only with a checkpoint found
    locally (a `.nemo` file, or a NeMo name already in the local cache), otherwise `embedding`."""
    if not config.diarization:
        return None
    if config.diarization_backend == "embedding":
        return "embedding"
    if config.diarization_backend != "sortformer":
        raise ValueError(f"--diarization-backend must be sortformer or embedding, not {config.diarization_backend!r}")
    checkpoint = local_sortformer_checkpoint(config.sortformer_model)
    if checkpoint:
        check_sortformer(checkpoint)
        return "sortformer"
    if config.sortformer_model and config.sortformer_model.endswith(".nemo"):
        raise ValueError(f"--sortformer-model {config.sortformer_model}: no such file")
    log.info("No Sortformer checkpoint found locally (--sortformer-model %s); using the embedding diarizer",
             config.sortformer_model or "not given")
    return "embedding"


def check_sortformer(checkpoint: str) -> None:
    """Restore the checkpoint once on the CPU at startup, so that a NeMo that does not import, a
    NeMo version that cannot read it, or a broken file stops the server with a clear error before it
    serves, instead of failing every connection's model load."""
    from backends.sortformer import SortformerLoadError, load_sortformer

    try:
        model = load_sortformer(checkpoint, "cpu")
    except (ImportError, OSError) as exc:  # (a torchaudio built for another torch fails with OSError)
        raise ValueError(f"--sortformer-model {checkpoint}: Sortformer needs NeMo "
                         f"(pip install 'nemo_toolkit[asr]==3.0.0'), which does not import here: {exc}") from exc
    except SortformerLoadError as exc:
        raise ValueError(f"--sortformer-model {checkpoint}: not a Sortformer checkpoint this NeMo "
                         f"can restore ({exc})") from exc
    del model


def local_sortformer_checkpoint(model: str | None) -> str | None:
    """A `.nemo` file for `model` on this machine: the path itself, or a NeMo name (e.g.
    `nvidia/diar_streaming_sortformer_4spk-v2`) already in the Hugging Face or NeMo cache."""
    if not model:
        return None
    if os.path.isfile(model):
        return model
    name = model.split("/")[-1]
    roots = [Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub",
             Path(os.environ.get("NEMO_CACHE_DIR", Path.home() / ".cache" / "torch" / "NeMo"))]
    for root in roots:
        if root.is_dir():
            for path in sorted(root.rglob("*.nemo")):
                if name in str(path):
                    return str(path)
    return None


def _load_diarizer(backend: str | None, config: ServerConfig, device: Device):
    if backend is None:
        return None, None, 0
    if backend == "sortformer":
        from backends.sortformer import SortformerDiarizer, load_sortformer

        model = load_sortformer(local_sortformer_checkpoint(config.sortformer_model), device.torch_device)
        return SortformerDiarizer(model, config.sortformer_latency), "diarization:sortformer", _param_bytes(model)
    from backends.segmented_diarizer import load_embedding_diarizer

    diarizer = load_embedding_diarizer(device.torch_device)
    log.info("Embedding diarizer: %s", diarizer.name)
    return diarizer, "diarization:embedding", sum(_param_bytes(m) for m in diarizer.modules())


def make_loader(config: ServerConfig) -> ModelLoader:
    backend = diarization_backend(config)

    def load(device: Device) -> DeviceModels:
        whisper_model = load_whisper(config.model, device.torch_device, cache_dir=config.cache_dir)
        asr = BatchedWhisper(whisper_model, config.effective_language, config.model_label, config.bucket_seconds,
                             max_batch=config.max_batch, beam_size=config.final_beam_size)
        asr.warm_up()
        vad = SileroVAD(device.torch_device)
        diarizer, diarizer_name, diarizer_bytes = _load_diarizer(backend, config, device)
        return DeviceModels(
            asr=asr,
            vad=vad,
            diarizer=diarizer,
            names=[f"whisper:{config.model_label}", "vad:silero"] + ([diarizer_name] if diarizer_name else []),
            model_bytes=_param_bytes(whisper_model) + _param_bytes(vad.net) + diarizer_bytes,
            stream_bytes=asr.measure_stream_bytes(),
        )

    return load
