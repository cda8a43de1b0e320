"""`/v1/listen`: Deepgram's live streaming API, so Deepgram's SDKs and the apps built on them work unchanged.

Binary frames are audio; text frames are control messages (`KeepAlive`, `Finalize`,
`CloseStream`; `Configure` is answered with `ConfigureFailure`). Out come `Results` (final ones as words are committed, interim ones
with the words still forming when `interim_results=true`), `SpeechStarted`
(`vad_events=true`), `UtteranceEnd` (`utterance_end_ms`) and, at the end, `Metadata`.

How Deepgram's parameters map onto the engine:
- `is_final`: committed words (they never change again); `speech_final`: the final
  `Results` that ends an utterance (the VAD heard the pause), carrying its last words;
- `endpointing=N`: N ms of silence end the utterance, as sent; without the parameter, Deepgram's
  default, 10 ms. The VAD hears in 32-ms windows, so the utterance ends at the end of the first
  window that reaches N ms: one window (32 ms) is the floor, and the only one. The pause is where
  the engine's utterance ends, its last decode commits all its words, and that final `Results`
  is the `speech_final` one: the turn's end carries its words and comes at the vendor's silence.
  The cost of a short pause is accuracy: each utterance is decoded on its own (prompted with
  the text before it), so pauses of a few tens of ms cut phrases into shorter decodes (over the
  real-speech set with tiny.en, the 10-ms default cost about 4 points of pooled WER beside the
  engine's 2-s pause, 300 ms about 0.2); a client that wants the accuracy sends a longer one;
- `endpointing=false`: no `speech_final` ever (pauses end nothing a client sees); the engine still
  ends its own utterances at its usual pause (2 s, or `utterance_end_ms` if shorter), whose words
  come as `is_final` `Results`; a turn then ends at `Finalize` or `UtteranceEnd`;
- `utterance_end_ms=N`: an `UtteranceEnd` once N ms have passed after the last word, when
  all the words are final (`last_word_end`: that word's end). Deepgram asks for
  `interim_results=true` with it; here it is sent either way;
- `Finalize`: the utterance under way is committed now, and its `Results` carry
  `from_finalize: true`; `CloseStream` (or an empty binary frame): everything, then
  `Metadata` and a 1000 close;
- `encoding`: `linear16`, `mulaw`, `alaw` at any `sample_rate` and `channels`
  (averaged to mono); omitted, or `opus`: a WebM or Ogg container, detected;
- `punctuate`/`smart_format`: punctuated words and transcript (Whisper's own
  punctuation; no number or date formatting); otherwise lower case, no punctuation;
- `diarize`: a `speaker` per word (0-based) when the server runs `--diarization`;
- accepted and not honoured: `model`, `version`, `tier`, `keywords`, `keyterm`, `search`,
  `replace`, `redact`, `numerals`, `profanity_filter`, `filler_words`, `multichannel` (mixed
  to one channel), `tag`, `callback`; `confidence` is always 1.0 (Whisper's word
  probabilities are not carried through).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from datetime import datetime, timezone

from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from ..audio.decoders import AudioDecodeError, Decoder, make_decoder
from ..audio.raw import RawDecoder
from ..errors import ConnectionFailure, DecodeFailed, FrameTooLarge
from ..live.admission import Refusal, admit
from ..live.captions import SpokenWord
from ..live.session import SessionOptions
from ..live.stream import LiveStream, StreamUpdate
from ..server import Server
from . import driver

DEFAULT_ENDPOINTING_MS = 10  # Deepgram's default
MODEL_UUID = "00000000-0000-4000-8000-000000000000"  # stands for the server's one Whisper model
_PUNCT = re.compile(r"[^\w'-]+")
ERRORS = {  # Deepgram's error codes in the HTTP answer to a refused upgrade
    "unauthorized": (401, "INVALID_AUTH", "Invalid credentials."),
    "origin": (403, "INSUFFICIENT_PERMISSIONS", "Origin not allowed."),
    "format": (400, "Bad Request", ""),
    "full": (429, "TOO_MANY_REQUESTS", "Too many requests: no GPU resources available. Try again shortly."),
    "draining": (503, "SERVICE_UNAVAILABLE", "The server is draining."),
}


def _flag(params, name: str, default: bool = False) -> bool:
    value = params.get(name)
    return default if value is None else value.lower() in ("true", "1", "yes")


class ListenOptions:
    """The query parameters of one `/v1/listen` request, checked."""

    def __init__(self, params) -> None:
        self.encoding = (params.get("encoding") or "").lower()
        self.sample_rate = int(params.get("sample_rate") or 16000)
        self.channels = int(params.get("channels") or 1)
        self.language = params.get("language") or None
        self.interim_results = _flag(params, "interim_results")
        self.punctuate = _flag(params, "punctuate") or _flag(params, "smart_format")
        self.diarize = _flag(params, "diarize")
        self.vad_events = _flag(params, "vad_events")
        self.utterance_end_ms = _ms(params, "utterance_end_ms") if params.get("utterance_end_ms") else None
        endpointing = (params.get("endpointing") or "").lower()
        # None: endpointing off (`false`); absent or `true`: Deepgram's default
        self.endpointing_ms = (None if endpointing == "false" else DEFAULT_ENDPOINTING_MS
                               if endpointing in ("", "true") else _ms(params, "endpointing"))
        if self.language and self.language.split("-")[0] not in ("en", "multi"):
            self.language = self.language.split("-")[0]
        elif self.language:
            self.language = None if self.language == "multi" else "en"

    @property
    def pause_seconds(self) -> float:
        """The silence that ends the engine's utterance: the endpointing, or without it the engine's own
        pause (shortened to `utterance_end_ms`, so that an UtteranceEnd is not held back by it)."""
        if self.endpointing_ms is not None:
            return self.endpointing_ms / 1000
        own = SessionOptions.utterance_pause_seconds
        return own if self.utterance_end_ms is None else min(own, self.utterance_end_ms / 1000)

    def decoder(self) -> Decoder:
        if self.encoding in ("", "opus"):
            return make_decoder("auto")
        return RawDecoder(self.encoding, self.sample_rate, self.channels)


def _ms(params, name: str) -> int:
    value = int(params[name])
    if value < 0:
        raise ValueError(f"{name} must be a number of milliseconds, at least 0")
    return value


def _options(params) -> ListenOptions | str:
    try:
        options = ListenOptions(params)
        options.decoder()
    except ValueError as exc:
        return f"Bad Request: {exc}"
    return options


def _denial(refusal: Refusal) -> Response:
    status, code, message = ERRORS.get(refusal.reason, (400, "Bad Request", refusal.message))
    headers = {"Retry-After": "5"} if status in (429, 503) else {}
    return JSONResponse({"err_code": code, "err_msg": message or refusal.message, "request_id": str(uuid.uuid4())},
                        status_code=status, headers=headers)


async def listen_endpoint(websocket: WebSocket) -> None:
    server: Server = websocket.app.state.server
    options = _options(websocket.query_params)
    stream_id = str(uuid.uuid4())
    admitted = await admit(server, websocket, stream_id, options if isinstance(options, str) else None,
                           http_reasons=frozenset({"unauthorized", "origin", "format", "full", "draining"}),
                           deny=_denial)
    if isinstance(admitted, Refusal):
        if not admitted.answered:
            await websocket.close(1008, admitted.message[:123])
        return
    assert isinstance(options, ListenOptions)
    config = server.config
    stream = LiveStream(server, admitted, stream_id, SessionOptions(
        config.silence_line_seconds, language=options.language, trim_seconds=config.trim_seconds,
        policy=config.policy, utterance_pause_seconds=options.pause_seconds))
    stream.start()
    try:
        await driver.serve(websocket, stream, DeepgramAdapter(stream, options, options.decoder(),
                                                              config.max_frame_bytes, config.model_label))
    finally:
        await stream.close()


class DeepgramAdapter:
    def __init__(self, stream: LiveStream, options: ListenOptions, decoder: Decoder, max_frame: int,
                 model: str) -> None:
        self.stream = stream
        self.options = options
        self.decoder = decoder
        self.max_frame = max_frame
        self.model = model
        self.created = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self._sha = hashlib.sha256()
        self._final_words = 0  # committed words already sent in final Results
        self._cursor = 0.0  # where the last final Results ended
        self._starts = 0  # utterance starts and ends already told
        self._ends = 0
        self._interim = ""
        self._cuts = 0  # the client's Finalize messages already answered with a final Results
        self._turn_words = 0  # final words sent of the utterance under way
        self._utterance_ended = 0  # the committed words when the last UtteranceEnd was sent
        self._heard_until = 0.0  # the end of the last word heard, final or interim

    # -- client → stream ----------------------------------------------------
    def opening(self) -> list[dict]:
        return []

    async def on_message(self, message: dict, stream: LiveStream) -> list[dict] | None:
        data = message.get("bytes")
        if data is not None:
            if len(data) > self.max_frame:
                raise FrameTooLarge(len(data), self.max_frame)
            if not data:  # Deepgram's older way to close a stream
                self._end(stream)
                return None
            self._sha.update(data)
            try:
                stream.feed(self.decoder.feed(data), len(data))
            except AudioDecodeError as exc:
                raise DecodeFailed(str(exc)) from exc
            return None
        try:
            kind = json.loads(message.get("text") or "").get("type")
        except (ValueError, AttributeError):
            raise _DataError("A text message must be a JSON control message (KeepAlive, Finalize, CloseStream)")
        if kind == "Finalize":
            stream.cut()
        elif kind == "CloseStream":
            self._end(stream)
        elif kind == "Configure":  # keyterm boosting: Whisper has none to change mid-stream
            return [{"type": "ConfigureFailure", "request_id": stream.id, "code": "CONFIGURE_KEYTERMS_NOT_SUPPORTED",
                     "description": "This server does not support keyterms; the stream goes on unchanged."}]
        elif kind != "KeepAlive":
            raise _DataError(f"Unknown control message type {kind!r}")
        return None

    def _end(self, stream: LiveStream) -> None:
        if not stream.ended:
            stream.feed(self.decoder.flush())
            stream.end()

    # -- stream → client ----------------------------------------------------
    def render(self, update: StreamUpdate) -> list[dict]:
        """In the order things were said: an utterance's `SpeechStarted`, its final words, and, once its
        end is told (`CaptionState.speech_ends`: after its last word), a `speech_final` Results of its
        own; then the next utterance's. Two utterances told ended in one state are two turns."""
        state = update.state
        events: list[dict] = []
        received = update.received_seconds
        new = list(state.words[self._final_words:])
        finalized = state.cuts > self._cuts
        starts = state.speech_starts
        for k in range(self._ends, len(state.speech_ends)):
            self._speech_started(events, starts[:k + 1])
            following = starts[k + 1] if k + 1 < len(starts) else math.inf
            split = next((i for i, w in enumerate(new) if w.start >= following), len(new))
            turn, new = new[:split], new[split:]
            if turn or self._turn_words:  # (`endpointing=false`: a pause ends no turn, its words are final)
                answers_cut = finalized and not new and k == len(state.speech_ends) - 1
                events.append(self._results(tuple(turn), True, speech_final=self.options.endpointing_ms is not None,
                                            received=received, from_finalize=answers_cut))
                finalized = finalized and not answers_cut
            self._turn_words = 0
        self._ends = len(state.speech_ends)
        self._speech_started(events, starts)
        if new or finalized:
            events.append(self._results(tuple(new), True, received=received, from_finalize=finalized))
            self._turn_words += len(new)
        if len(state.words) > self._final_words or state.cuts > self._cuts:
            self._interim = ""
        self._cuts = state.cuts
        self._final_words = len(state.words)
        if state.tentative:
            self._heard_until = max(self._heard_until, state.tentative[-1].end)
        if self.options.utterance_end_ms is not None:
            events += self._utterance_end(state, received)
        if self.options.interim_results:
            text = self._transcript(state.tentative)
            if state.tentative and text != self._interim:
                events.append(self._results(state.tentative, False, received=received))
                self._interim = text
        return events

    def _speech_started(self, events: list[dict], starts: tuple[float, ...]) -> None:
        """`SpeechStarted` for each of `starts` not told yet (`vad_events=true`)."""
        if self.options.vad_events:
            for start in starts[self._starts:]:
                events.append({"type": "SpeechStarted", "channel": [0, 1], "timestamp": round(start, 3)})
        self._starts = max(self._starts, len(starts))

    def _utterance_end(self, state, received: float) -> list[dict]:
        """`UtteranceEnd`, once per gap: `utterance_end_ms` after the last word heard (final or interim,
        as Deepgram measures it), with no utterance open (so every word before the gap is final and sent)."""
        if (not state.words or self._utterance_ended == len(state.words) or state.tentative
                or len(state.speech_ends) < len(state.speech_starts)):
            return []
        last = state.words[-1].end
        if received - max(last, self._heard_until) < self.options.utterance_end_ms / 1000:
            return []
        self._utterance_ended = len(state.words)
        return [{"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": round(last, 3)}]

    def ending(self, update: StreamUpdate) -> driver.Ending:
        events = self.render(update)
        if len(update.state.words) > self._final_words:
            events.append(self._results(update.state.words[self._final_words:], True,
                                        speech_final=self.options.endpointing_ms is not None,
                                        received=update.received_seconds))
        events.append(self._metadata(update.received_seconds))
        if update.drained:
            return driver.Ending(events, 1001, "Server shutting down")
        return driver.Ending(events, 1000, "")

    def failure(self, failure: ConnectionFailure) -> driver.Ending:
        if isinstance(failure, (DecodeFailed, _DataError)):
            return driver.Ending([], 1008, "DATA-0000")
        if failure.code == 1001:
            return driver.Ending([], 1001, "Server shutting down")
        return driver.Ending([], failure.code, "NET-0001")

    def _results(self, words: tuple[SpokenWord, ...], final: bool, speech_final: bool = False,
                 received: float = 0.0, from_finalize: bool = False) -> dict:
        start = self._cursor if final else (words[0].start if words else self._cursor)
        end = max([w.end for w in words] or [received if speech_final else start])
        if final:
            self._cursor = max(self._cursor, end)
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(max(end - start, 0.0), 3),
            "start": round(start, 3),
            "is_final": final,
            "speech_final": speech_final and final,
            "from_finalize": from_finalize and final,
            "channel": {"alternatives": [{
                "transcript": self._transcript(words),
                "confidence": 1.0 if words else 0.0,
                "words": [self._word(w) for w in words],
            }]},
            "metadata": {"request_id": self.stream.id, "model_uuid": MODEL_UUID,
                         "model_info": {"name": self.model, "version": "streamserver", "arch": "whisper"}},
        }

    def _word(self, w: SpokenWord) -> dict:
        return word_json(w.text, w.start, w.end, w.speaker, self.options)

    def _transcript(self, words: tuple[SpokenWord, ...]) -> str:
        if self.options.punctuate:
            return " ".join(w.text for w in words)
        return " ".join(p for p in (_plain(w.text) for w in words) if p)

    def _metadata(self, received: float) -> dict:
        return {"type": "Metadata", **metadata_json(self.stream.id, self._sha.hexdigest(), self.created, received,
                                                    self.options.channels, self.model)}


def _plain(text: str) -> str:
    return _PUNCT.sub("", text.lower()).strip("'-")


def word_json(text: str, start: float, end: float, speaker: int, options: ListenOptions) -> dict:
    """A word as Deepgram's `words` carry it, live and pre-recorded; `speaker` 1, 2, ... (0: not known)."""
    out = {"word": _plain(text), "start": round(start, 3), "end": round(end, 3), "confidence": 1.0,
           "punctuated_word": text if options.punctuate else _plain(text)}
    if options.diarize:
        out["speaker"] = max(speaker - 1, 0)
        out["speaker_confidence"] = 1.0 if speaker > 0 else 0.0
    return out


def metadata_json(request_id: str, sha256: str, created: str, duration: float, channels: int, model: str) -> dict:
    """Deepgram's metadata of a request, live (`Metadata` at the end) and pre-recorded (the answer's)."""
    return {
        "transaction_key": "deprecated",
        "request_id": request_id,
        "sha256": sha256,
        "created": created,
        "duration": round(duration, 3),
        "channels": channels,
        "models": [MODEL_UUID],
        "model_info": {MODEL_UUID: {"name": model, "version": "streamserver", "arch": "whisper"}},
    }


class _DataError(ConnectionFailure):
    """Input Deepgram would refuse as DATA-0000 (close 1008)."""

    code = 1008
