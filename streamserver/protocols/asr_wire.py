"""The wire format: every JSON message the server sends is built here, from plain data.

The contract's field names appear in this module only; the rest of the server
deals in `Line` and `CaptionState` values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..live.captions import SILENCE_SPEAKER, CaptionState, Line  # noqa: F401 - re-exported

@dataclass(frozen=True)
class ConfigInfo:
    gpu_id: int
    connection_id: str
    device: str
    model: str
    diarization: bool
    format: str
    sample_rate: int = 16000
    extra: dict = field(default_factory=dict)


def format_time(seconds: float) -> str:
    """`H:MM:SS.cc`, as WhisperLiveKit 0.2.x writes stream times."""
    cs = int(round(max(seconds, 0.0) * 100))
    h, rem = divmod(cs, 360000)
    m, rem = divmod(rem, 6000)
    s, cc = divmod(rem, 100)
    return f"{h}:{m:02d}:{s:02d}.{cc:02d}"


def config_message(info: ConfigInfo, mode: str = "full") -> dict:
    return {
        "type": "config",
        "useAudioWorklet": info.format == "pcm",
        "mode": mode,
        "gpu_id": info.gpu_id,
        "connection_id": info.connection_id,
        "device": info.device,
        "model": info.model,
        "diarization": info.diarization,
        "sample_rate": info.sample_rate,
        "format": info.format,
        **info.extra,
    }


def stream_config(stream, fmt: str, mode: str, extra: dict) -> dict:
    """The `config` message of a live stream (`LiveStream`), for its speaker (`fmt`: the audio format
    it sends) and for its viewers (`"none"`)."""
    config = stream.server.config
    return config_message(ConfigInfo(
        gpu_id=stream.device.id, connection_id=stream.id, device=stream.device.label, model=config.model_label,
        diarization=config.diarization, format=fmt, extra=extra), mode=mode)


def line_message(line: Line) -> dict:
    return {
        "speaker": line.speaker,
        "text": line.text,
        "start": format_time(line.start),
        "end": format_time(line.end),
        "start_s": round(line.start, 2),
        "end_s": round(line.end, 2),
    }


def update_fields(state: CaptionState) -> dict:
    """An update's fields beside its lines."""
    return {
        "status": "active_transcription" if state.speech_detected else "no_audio_detected",
        "buffer_transcription": state.buffer_transcription,
        "buffer_diarization": state.buffer_diarization,
        "buffer_translation": "",
        "remaining_time_transcription": round(max(state.remaining_transcription, 0.0), 2),
        "remaining_time_diarization": round(max(state.remaining_diarization, 0.0), 2),
    }


def update_message(state: CaptionState) -> dict:
    """The whole state (`full` mode: WhisperLiveKit's update)."""
    fields = update_fields(state)
    return {"status": fields.pop("status"), "lines": [line_message(line) for line in state.lines], **fields}


def incremental_message(seq: int, from_line: int, lines: list[dict], fields: dict) -> dict:
    """`incremental` mode: the lines from `from_line` on (every one before it is unchanged)."""
    rest = dict(fields)
    return {"status": rest.pop("status"), "seq": seq, "from_line": from_line, "lines": lines, **rest}


def error_message(message: str, code: int) -> dict:
    return {"type": "error", "status": "error", "error": message, "code": code}


def ready_to_stop_message() -> dict:
    return {"type": "ready_to_stop"}


def dumps(message: dict) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))
