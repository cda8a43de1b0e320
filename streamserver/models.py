"""How a device's models are built from the configuration (the runtime calls this on the worker)."""
from __future__ import annotations

import torch

from backends.vad import SileroVAD
from backends.whisper_asr import WhisperASR
from backends.whisper_loader import load_whisper
from gpu_manager import Device

from .config import ServerConfig
from .runtime import DeviceModels, ModelLoader


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def make_loader(config: ServerConfig) -> ModelLoader:
    def load(device: Device) -> DeviceModels:
        whisper_model = load_whisper(config.model, device.torch_device, cache_dir=config.cache_dir)
        asr = WhisperASR(whisper_model, config.effective_language, config.model_label)
        asr.warm_up()
        vad = SileroVAD(device.torch_device)
        return DeviceModels(
            asr=asr,
            vad=vad,
            names=[f"whisper:{config.model_label}", "vad:silero"],
            model_bytes=_param_bytes(whisper_model) + _param_bytes(vad.net),
            stream_bytes=asr.stream_bytes(),
        )

    return load
