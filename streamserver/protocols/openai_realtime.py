"""`/v1/realtime?intent=transcription`: OpenAI's Realtime API transcription sessions (the GA API), so
the `openai` package's realtime client and the voice-agent frameworks built on it work unchanged.

Client events: `session.update` (a `transcription` session: input format, language, prompt,
turn detection), `input_audio_buffer.append` (base64 audio), `.commit`, `.clear`. Server
events: `session.created`/`.updated`, `input_audio_buffer.speech_started`/`.speech_stopped`/
`.committed`/`.cleared`, `conversation.item.input_audio_transcription.delta`/`.completed`, and
`error` in OpenAI's shape (the session stays open after a bad event, as OpenAI's does).

One item is one utterance. With `server_vad` (the default) the engine's VAD starts and ends
items: `speech_started` when it hears speech, `delta` events while the utterance's words are
committed (committed words never change, so the deltas of an item add up to its transcript),
then `speech_stopped`, `committed` and `completed`.

Turn detection, as OpenAI documents it; `session.created`/`.updated` report the silence that runs:
- `server_vad`: OpenAI's defaults (`threshold` 0.5, `prefix_padding_ms` 300, `silence_duration_ms`
  500); a `turn_detection` without `silence_duration_ms` runs 500 ms. That silence is where the
  utterance ends: its last decode commits all of its words, then the item is committed and
  completed, so an item's end carries every word of it. The VAD hears in 32-ms windows, so the
  silence runs to the end of the first window that reaches it; the one floor is one window:
  a value under 32 ms is raised to 32 and reported as 32.
- `semantic_vad`: there is no semantic model here; it runs as `server_vad` with a silence set by
  its `eagerness`, and is reported as the `server_vad` that runs. OpenAI documents only the longest
  waits (`low` 8 s, `medium`/`auto` 4 s, `high` 2 s), which a turn that sounds finished does not
  wait for; here the silence keeps their 1 : 2 : 4 proportions from `server_vad`'s 500 ms, so the most
  eager waits as `server_vad` does: `high` 500 ms, `medium` and `auto` 1000 ms, `low` 2000 ms
  (each within its documented longest wait).
- `turn_detection: null`: an item ends only at the client's `commit`. The engine still ends its own
  utterances at its usual pause (`SessionOptions.utterance_pause_seconds`, 2 s: the best
  accuracy), which commits their words into the open item; no VAD event is sent.

Accepted and not honoured: `noise_reduction`, `include` (no logprobs), the transcription `model`
(the server runs its own), `threshold` and `prefix_padding_ms` of the VAD (echoed as given; the
engine's VAD starts speech at its own threshold), and `clear` (audio already heard stays in the
stream; the event is answered).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field

from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from ..audio.containers import AudioDecodeError
from ..audio.raw import RawDecoder
from ..errors import ConnectionFailure, ShuttingDown
from ..live.admission import Refusal, admit
from ..live.session import SessionOptions
from ..live.stream import LiveStream, StreamUpdate
from ..server import Server
from . import driver

FORMATS = {"audio/pcm": ("linear16", 24000), "audio/pcmu": ("mulaw", 8000), "audio/pcma": ("alaw", 8000)}
SERVER_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
MIN_SILENCE_MS = 32  # one VAD window (backends.vad.WINDOW): the finest pause the VAD can hear
EAGERNESS_MS = {"high": 500, "medium": 1000, "auto": 1000, "low": 2000}  # semantic_vad, see above
SESSION_SECONDS = 3600


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def _error(kind: str, message: str, code: str | None = None, param: str | None = None,
           event_id: str | None = None) -> dict:
    return {"type": "error", "event_id": _id("event"),
            "error": {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id}}


def _denial(refusal: Refusal) -> Response:
    if refusal.reason == "unauthorized":
        body = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                          "code": "invalid_api_key", "param": None}}
        return JSONResponse(body, status_code=401)
    if refusal.reason == "format":
        return JSONResponse({"error": {"message": refusal.message, "type": "invalid_request_error",
                                       "code": "invalid_intent", "param": "intent"}}, status_code=400)
    busy = refusal.reason in ("full", "draining")
    return JSONResponse({"error": {"message": refusal.message, "type": "server_error" if busy else
                                   "invalid_request_error", "code": refusal.reason, "param": None}},
                        status_code=503 if busy else 403, headers={"Retry-After": "5"} if busy else {})


async def realtime_endpoint(websocket: WebSocket) -> None:
    server: Server = websocket.app.state.server
    intent = websocket.query_params.get("intent")
    bad = None if intent == "transcription" else (
        "This server serves transcription sessions only: connect with ?intent=transcription")
    stream_id = str(uuid.uuid4())
    admitted = await admit(server, websocket, stream_id, bad,
                           http_reasons=frozenset({"unauthorized", "origin", "format"}), deny=_denial)
    if isinstance(admitted, Refusal):
        if not admitted.answered:  # full or draining: said the Realtime way, then the close
            await websocket.send_text(json.dumps(_error("server_error", admitted.message, admitted.reason)))
            await websocket.close(1013 if admitted.reason == "full" else 1001, admitted.message[:123])
        return
    config = server.config
    stream = LiveStream(server, admitted, stream_id, SessionOptions(
        config.silence_line_seconds, language=None if config.effective_language == "auto" else
        config.effective_language, trim_seconds=config.trim_seconds, policy=config.policy,
        utterance_pause_seconds=SERVER_VAD["silence_duration_ms"] / 1000))  # what session.created reports
    stream.start()
    try:
        await driver.serve(websocket, stream, RealtimeAdapter(stream, config.model_label))
    finally:
        await stream.close()


def _turn_detection(detection) -> dict | None | str:
    """A client's `turn_detection` as it will run (see the module's docstring), or what is wrong with it."""
    if detection is None:
        return None
    if not isinstance(detection, dict) or detection.get("type", "server_vad") not in ("server_vad", "semantic_vad"):
        return "turn_detection.type must be server_vad, semantic_vad or null"
    running = dict(SERVER_VAD)
    if detection.get("type") == "semantic_vad":
        eagerness = detection.get("eagerness") or "auto"
        if eagerness not in EAGERNESS_MS:
            return "turn_detection.eagerness must be low, medium, high or auto"
        running["silence_duration_ms"] = EAGERNESS_MS[eagerness]
        return running
    for name in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
        value = detection.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            return f"turn_detection.{name} must be a number, at least 0"
        running[name] = value
    running["silence_duration_ms"] = max(MIN_SILENCE_MS, int(round(running["silence_duration_ms"])))
    return running


@dataclass
class _Item:
    """One utterance: the conversation item its transcription belongs to."""

    id: str
    start: float | None = None  # stream seconds (None: begun by a commit, not by the VAD)
    text: list[str] = field(default_factory=list)


class RealtimeAdapter:
    def __init__(self, stream: LiveStream, model: str) -> None:
        self.stream = stream
        self.model = model
        self.session_id = _id("sess")
        self.format = "audio/pcm"
        self.decoder = RawDecoder(*FORMATS[self.format])
        self.language: str | None = None
        self.prompt = ""
        self.turn_detection: dict | None = dict(SERVER_VAD)  # what runs (the stream starts with it)
        self.expires_at = int(time.time()) + SESSION_SECONDS
        self._item: _Item | None = None
        self._previous: str | None = None
        self._words = 0  # committed words already told
        self._starts = 0
        self._ends = 0
        self._cuts = 0
        self._commits = 0  # the client's commits not yet answered
        self._appended = 0  # bytes appended since the last commit

    # -- the session object -----------------------------------------------------
    def session(self) -> dict:
        return {
            "type": "transcription",
            "object": "realtime.transcription_session",
            "id": self.session_id,
            "expires_at": self.expires_at,
            "include": None,
            "audio": {"input": {
                "format": {"type": self.format, **({"rate": 24000} if self.format == "audio/pcm" else {})},
                "transcription": {"model": self.model, "language": self.language, "prompt": self.prompt},
                "noise_reduction": None,
                "turn_detection": self.turn_detection,
            }},
        }

    def opening(self) -> list[dict]:
        return [{"type": "session.created", "event_id": _id("event"), "session": self.session()}]

    # -- client events --------------------------------------------------------
    async def on_message(self, message: dict, stream: LiveStream) -> list[dict] | None:
        text = message.get("text")
        if text is None:
            return [_error("invalid_request_error", "Binary frames are not accepted: send audio with "
                           "input_audio_buffer.append (base64)", "invalid_message")]
        try:
            event = json.loads(text)
            kind = event.get("type")
        except (ValueError, AttributeError):
            return [_error("invalid_request_error", "The message is not a JSON object", "invalid_json")]
        event_id = event.get("event_id")
        handler = {
            "session.update": self._update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
        }.get(kind)
        if handler is None:
            return [_error("invalid_request_error", f"Invalid value: {kind!r}. Supported values are: "
                           "'session.update', 'input_audio_buffer.append', 'input_audio_buffer.commit' and "
                           "'input_audio_buffer.clear'.", "invalid_value", "type", event_id)]
        return handler(event, stream, event_id)

    def _update(self, event: dict, stream: LiveStream, event_id: str | None) -> list[dict]:
        session = event.get("session")
        if not isinstance(session, dict) or session.get("type", "transcription") != "transcription":
            return [_error("invalid_request_error", "This endpoint serves transcription sessions: "
                           "session.type must be 'transcription'", "invalid_value", "session.type", event_id)]
        audio_in = (session.get("audio") or {}).get("input") or {}
        detection = _turn_detection(audio_in.get("turn_detection"))
        if isinstance(detection, str):  # (checked before anything of the update is applied)
            return [_error("invalid_request_error", detection, "invalid_value", "session.audio.input.turn_detection",
                           event_id)]
        fmt = audio_in.get("format")
        if fmt is not None:
            kind, rate = (fmt or {}).get("type"), (fmt or {}).get("rate")
            if kind not in FORMATS or (kind == "audio/pcm" and rate not in (None, 24000)):
                return [_error("invalid_request_error", f"Unsupported audio format {fmt!r}: use audio/pcm at "
                               "24000 Hz, audio/pcmu or audio/pcma", "invalid_value",
                               "session.audio.input.format", event_id)]
            if kind != self.format:
                self._flush(event_id)  # (a resampler error here is moot: the decoder is replaced)
                self.format, self.decoder = kind, RawDecoder(*FORMATS[kind])
        transcription = audio_in.get("transcription") or {}
        if "language" in transcription:
            self.language = transcription["language"] or None
        if "prompt" in transcription:
            self.prompt = transcription["prompt"] or ""
        if "turn_detection" in audio_in:
            self.turn_detection = detection
        stream.retune(language=self.language, utterance_pause_seconds=self.pause_seconds, prompt=self.prompt or None)
        return [{"type": "session.updated", "event_id": _id("event"), "session": self.session()}]

    @property
    def pause_seconds(self) -> float:
        """The silence that ends an utterance: the turn detection's, or the engine's own without one."""
        if self.turn_detection is None:
            return SessionOptions.utterance_pause_seconds
        return self.turn_detection["silence_duration_ms"] / 1000

    def _append(self, event: dict, stream: LiveStream, event_id: str | None) -> list[dict] | None:
        try:
            data = base64.b64decode(event.get("audio") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            return [_error("invalid_request_error", "input_audio_buffer.append: audio must be base64",
                           "invalid_value", "audio", event_id)]
        if len(data) > stream.server.config.max_frame_bytes:
            return [_error("invalid_request_error", f"Audio chunk too large: {len(data)} bytes (limit "
                           f"{stream.server.config.max_frame_bytes})", "invalid_value", "audio", event_id)]
        self._appended += len(data)
        try:
            stream.feed(self.decoder.feed(data), len(data))
        except AudioDecodeError as exc:  # the protocol's error event; the session goes on
            return [_error("invalid_request_error", f"input_audio_buffer.append: {exc}", "invalid_value", "audio",
                           event_id)]
        return None

    def _commit(self, event: dict, stream: LiveStream, event_id: str | None) -> list[dict] | None:
        if not self._appended and self._item is None:
            return [_error("invalid_request_error", "Error committing input audio buffer: the buffer is empty.",
                           "input_audio_buffer_commit_empty", None, event_id)]
        self._appended = 0
        self._commits += 1
        errors = self._flush(event_id)  # the audio so far, all of it; the decoder takes more appends after
        stream.cut()
        return errors or None

    def _flush(self, event_id: str | None) -> list[dict]:
        try:
            self.stream.feed(self.decoder.flush())
        except AudioDecodeError as exc:
            return [_error("invalid_request_error", f"input_audio_buffer: {exc}", "invalid_value", "audio", event_id)]
        return []

    def _clear(self, event: dict, stream: LiveStream, event_id: str | None) -> list[dict]:
        self._appended = 0
        return [{"type": "input_audio_buffer.cleared", "event_id": _id("event")}]

    # -- stream → events ------------------------------------------------------
    def render(self, update: StreamUpdate) -> list[dict]:
        state = update.state
        events: list[dict] = []
        vad = self.turn_detection is not None
        # An utterance's end is told after its last word (`CaptionState.speech_ends`): every word before
        # the next utterance's start belongs to the item it closes.
        starts = state.speech_starts
        timeline = sorted(
            [(starts[i + 1] if i + 1 < len(starts) else math.inf, 0, "end", t)
             for i, t in enumerate(state.speech_ends[self._ends:], self._ends)]
            + [(t, 1, "start", t) for t in state.speech_starts[self._starts:]]
            + [(w.start, 2, i, w.start) for i, w in enumerate(state.words[self._words:], self._words)],
            key=lambda x: (x[0], x[1]))
        self._starts, self._ends = len(state.speech_starts), len(state.speech_ends)
        for _, _, what, at in timeline:
            if what == "start":
                if vad:
                    events += self._finish_item(at)  # (a word-less item the VAD opened and closed)
                    self._item = _Item(_id("item"), at)
                    events.append({"type": "input_audio_buffer.speech_started", "event_id": _id("event"),
                                   "audio_start_ms": int(at * 1000), "item_id": self._item.id})
            elif what == "end":
                if vad and self._item is not None:
                    events.append({"type": "input_audio_buffer.speech_stopped", "event_id": _id("event"),
                                   "audio_end_ms": int(at * 1000), "item_id": self._item.id})
                    events += self._finish_item(at)
            else:
                word = state.words[what]
                if self._item is None:
                    self._item = _Item(_id("item"), word.start)
                delta = (" " if self._item.text else "") + word.text
                self._item.text.append(word.text)
                events.append({"type": "conversation.item.input_audio_transcription.delta", "event_id": _id("event"),
                               "item_id": self._item.id, "content_index": 0, "delta": delta})
        self._words = len(state.words)
        # the client's commits, each in its own state: whatever is open is an item now
        for _ in range(state.cuts - self._cuts):
            if self._commits:
                self._commits -= 1
                events += self._finish_item(update.received_seconds)
        self._cuts = state.cuts
        return events

    def _finish_item(self, end: float) -> list[dict]:
        item, self._item = self._item, None
        if item is None:
            return []
        previous, self._previous = self._previous, item.id
        transcript = " ".join(item.text)
        seconds = max(end - item.start, 0.0) if item.start is not None else 0.0
        return [
            {"type": "input_audio_buffer.committed", "event_id": _id("event"), "previous_item_id": previous,
             "item_id": item.id},
            {"type": "conversation.item.input_audio_transcription.completed", "event_id": _id("event"),
             "item_id": item.id, "content_index": 0, "transcript": transcript,
             "usage": {"type": "duration", "seconds": round(seconds, 3)}},
        ]

    def ending(self, update: StreamUpdate) -> driver.Ending:
        events = self.render(update)
        events += self._finish_item(update.received_seconds)
        if update.drained:
            events.append(_error("server_error", "The server is shutting down", "server_shutting_down"))
            return driver.Ending(events, 1001, "Server shutting down")
        return driver.Ending(events, 1000, "")

    def failure(self, failure: ConnectionFailure) -> driver.Ending:
        kind = "server_error" if failure.code in (1001, 1011) else "invalid_request_error"
        code = 1001 if isinstance(failure, ShuttingDown) else failure.code
        return driver.Ending([_error(kind, failure.message, "server_error" if kind == "server_error" else None)],
                             code, failure.message)
