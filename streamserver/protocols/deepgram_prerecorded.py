"""`POST /v1/listen`: Deepgram's pre-recorded API, so Deepgram's SDKs (`listen.v1.media.transcribe_file`)
and the frameworks built on them (LiveKit's `deepgram.STT.recognize()`) work unchanged.

The body is the audio file itself, any container FFmpeg reads (`Content-Type: audio/*`, `video/*`,
`application/octet-stream` or none); with `encoding=linear16|mulaw|alaw` (and `sample_rate`,
`channels`) it is raw samples. The file goes through the same path as `/v1/audio/transcriptions`:
saved into the jobs folder as it arrives (`--max-upload-mb`), decoded once up front, then transcribed
as a job in the devices' file lane while the client waits (`--sync-max-seconds` at most). The answer
is Deepgram's response: `metadata` and `results.channels[0].alternatives[0]` (`transcript`,
`confidence`, `words`; `paragraphs` with `paragraphs=true`), and `results.utterances` with
`utterances=true` (split at pauses of `utt_split` seconds, default 0.8, and speaker changes).

Refused in Deepgram's error shape (`err_code`, `err_msg`, `request_id`), each logged once: a JSON body
(`{"url": ...}`: this server fetches no URLs), `callback` (it calls nobody back), an empty or
undecodable body, a bad parameter (400); a file over the limits (413); a form or text body (415);
a wrong token (401 `INVALID_AUTH`).

Query parameters as on the streaming socket (`deepgram.py`): `punctuate`/`smart_format` give
punctuated words and transcript; `diarize` a `speaker` per word (0-based) from the offline diarizer
a diarized job uses; `language` as there. Accepted and not honoured: `model`, `version`, `tier`,
`detect_language`, `keywords`, `keyterm`, `search`, `replace`, `redact`, `numerals`,
`profanity_filter`, `filler_words`, `multichannel` (mixed to one channel), `tag`, `mip_opt_out` and
the intelligence features (`summarize`, `topics`, `intents`, `sentiment`, `detect_entities`).
`confidence` is always 1.0.
"""
from __future__ import annotations

import logging
import struct
import uuid
from datetime import datetime, timezone
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..audio.raw import ENCODINGS as RAW_ENCODINGS, RawDecoder
from ..jobs.api import SyncJobFailed, audio_seconds, transcribe_now
from ..jobs.file_audio import FileDecodeError, with_speakers
from ..jobs.upload import UploadRefused, receive_body
from ..ops.auth import token_ok
from .deepgram import ListenOptions, _flag, metadata_json, word_json

log = logging.getLogger("streamserver.deepgram")

CONTAINER_ENCODINGS = ("flac", "opus", "ogg-opus", "amr-nb", "amr-wb", "mp3")  # headered: FFmpeg detects them
DEFAULT_UTT_SPLIT = 0.8  # Deepgram's default pause between utterances, seconds
PARAGRAPH_PAUSE = 1.5  # a pause this long (or a new speaker) starts a new paragraph
_CODES = {400: "Bad Request", 401: "INVALID_AUTH", 413: "Payload Too Large", 415: "Unsupported Media Type",
          500: "Internal Server Error"}
_WAV_TAGS = {"linear16": (1, 16), "alaw": (6, 8), "mulaw": (7, 8)}


def _refuse(status: int, message: str, request_id: str) -> JSONResponse:
    log.info("POST /v1/listen %s refused (%d): %s", request_id, status, message)
    return JSONResponse({"err_code": _CODES[status], "err_msg": message, "request_id": request_id},
                        status_code=status)


class _PrerecordedOptions:
    """The query of one pre-recorded request: the streaming socket's options, and the pre-recorded ones."""

    def __init__(self, params) -> None:
        self.listen = ListenOptions(params)
        encoding = self.listen.encoding
        if encoding and encoding not in RAW_ENCODINGS + CONTAINER_ENCODINGS:
            raise ValueError(f"unsupported encoding {encoding!r} (raw: {', '.join(RAW_ENCODINGS)}; or a file in "
                             "any container, with no encoding)")
        self.raw = encoding in RAW_ENCODINGS
        if self.raw:
            RawDecoder(encoding, self.listen.sample_rate, self.listen.channels)  # checks the rate and channels
        self.utterances = _flag(params, "utterances")
        self.paragraphs = _flag(params, "paragraphs")
        self.utt_split = float(params.get("utt_split") or DEFAULT_UTT_SPLIT)
        if self.paragraphs:  # Deepgram: paragraphs turn punctuation on
            self.listen.punctuate = True

    def wav_header(self, data_bytes: int) -> bytes:
        """A WAV header that makes raw samples a file FFmpeg reads (its sizes patched once the body is in)."""
        tag, bits = _WAV_TAGS[self.listen.encoding]
        channels, rate = self.listen.channels, self.listen.sample_rate
        block = channels * bits // 8
        return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
                + struct.pack("<IHHIIHH", 16, tag, channels, rate, rate * block, block, bits)
                + b"data" + struct.pack("<I", data_bytes))


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def prerecorded_endpoint(request: Request) -> Response:
    request_id = str(uuid.uuid4())
    server = request.app.state.server
    if not token_ok(server.config.api_token, request):
        return _refuse(401, "Invalid credentials.", request_id)
    media = _media_type(request)
    if media == "application/json" or media.endswith("+json"):
        return _refuse(400, await _json_reason(request), request_id)
    if media.startswith(("text/", "multipart/")) or media == "application/x-www-form-urlencoded":
        return _refuse(415, f"Content-Type {media!r} is not audio: send the audio file itself as the body "
                            "(audio/*, video/* or application/octet-stream)", request_id)
    try:
        options = _PrerecordedOptions(request.query_params)
    except ValueError as exc:
        return _refuse(400, f"Bad Request: {exc}", request_id)
    if request.query_params.get("callback"):
        return _refuse(400, "Bad Request: callback is not supported: this server calls nobody back; "
                            "leave it out and the transcript is the answer", request_id)
    created = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    try:
        path, _, sha = await receive_body(request, options.wav_header(0) if options.raw else b"")
    except UploadRefused as refused:
        return _refuse(refused.status, refused.message if refused.status != 400 else f"Bad Request: {refused.message}",
                       request_id)
    if options.raw:
        _patch_wav_sizes(path, options)
    try:
        seconds = await audio_seconds(path)
    except FileDecodeError as exc:
        return _refuse(400, f"Bad Request: failed to process audio: corrupt or unsupported data ({exc})",
                       request_id)
    if seconds > server.config.sync_max_seconds:
        path.unlink(missing_ok=True)
        return _refuse(413, f"The file is {seconds:.0f} s of audio, over --sync-max-seconds "
                            f"({server.config.sync_max_seconds:g} s): submit it to POST /jobs", request_id)
    try:
        words, turns = await transcribe_now(server.jobs, path, options.listen.language,
                                            diarization=options.listen.diarize)
    except SyncJobFailed as exc:
        log.error("POST /v1/listen %s: transcription failed: %s", request_id, exc)
        return JSONResponse({"err_code": _CODES[500], "err_msg": f"Transcription failed: {exc}",
                             "request_id": request_id}, status_code=500)
    if turns:
        words, _ = with_speakers(words, turns)
    return JSONResponse(_response(words, options, request_id=request_id, sha256=sha, created=created,
                                  duration=seconds, model=server.config.model_label))


async def _json_reason(request: Request) -> str:
    """Why a JSON body is refused: Deepgram's `{"url": ...}` is one this server never fetches."""
    import json

    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > 65536:
            break
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and "url" in body:
        return ("Bad Request: this server does not fetch audio from URLs: send the audio file itself as the "
                "request body (Content-Type: audio/* or application/octet-stream)")
    return ("Bad Request: Content-type was application/json, but this server takes only the audio itself "
            "as the body (Content-Type: audio/* or application/octet-stream)")


def _patch_wav_sizes(path: Path, options: _PrerecordedOptions) -> None:
    with open(path, "r+b") as f:
        size = f.seek(0, 2) - 44
        f.seek(0)
        f.write(options.wav_header(size))


# -- the answer -------------------------------------------------------------
def _response(stored: list[dict], options: _PrerecordedOptions, *, request_id: str, sha256: str, created: str,
              duration: float, model: str) -> dict:
    words = [_word(w, options) for w in stored if w["word"].strip()]
    alternative: dict = {"transcript": _transcript(words, options), "confidence": 1.0 if words else 0.0,
                         "words": words}
    if options.paragraphs:
        alternative["paragraphs"] = _paragraphs(words, options)
    results: dict = {"channels": [{"alternatives": [alternative]}]}
    if options.utterances:
        results["utterances"] = _utterances(words, options)
    return {"metadata": metadata_json(request_id, sha256, created, duration, 1, model), "results": results}


def _word(stored: dict, options: _PrerecordedOptions) -> dict:
    """A job's stored word (`speaker` 1, 2, ... when the job was diarized) as Deepgram's."""
    return word_json(stored["word"].strip(), stored["start"], stored["end"], int(stored.get("speaker", 0)),
                     options.listen)


def _transcript(words: list[dict], options: _PrerecordedOptions) -> str:
    key = "punctuated_word" if options.listen.punctuate else "word"
    return " ".join(w[key] for w in words if w[key])


def _runs(words: list[dict], pause: float, at_sentence_end: bool = False) -> list[list[dict]]:
    """The words in runs, a new run after a pause of `pause` seconds, a speaker change, or
    (with `at_sentence_end`) a word that ends a sentence."""
    runs: list[list[dict]] = []
    for w in words:
        prev = runs[-1][-1] if runs else None
        if (prev is None or w["start"] - prev["end"] >= pause or w.get("speaker") != prev.get("speaker")
                or (at_sentence_end and prev["punctuated_word"].endswith((".", "?", "!")))):
            runs.append([])
        runs[-1].append(w)
    return runs


def _utterances(words: list[dict], options: _PrerecordedOptions) -> list[dict]:
    out = []
    for run in _runs(words, options.utt_split):
        utterance = {"start": run[0]["start"], "end": run[-1]["end"], "confidence": 1.0, "channel": 0,
                     "transcript": _transcript(run, options), "words": run, "id": str(uuid.uuid4())}
        if options.listen.diarize:
            utterance["speaker"] = run[0]["speaker"]
        out.append(utterance)
    return out


def _paragraphs(words: list[dict], options: _PrerecordedOptions) -> dict:
    paragraphs, texts = [], []
    for run in _runs(words, PARAGRAPH_PAUSE):
        sentences = [{"text": _transcript(s, options), "start": s[0]["start"], "end": s[-1]["end"]}
                     for s in _runs(run, PARAGRAPH_PAUSE, at_sentence_end=True)]
        paragraph = {"sentences": sentences, "num_words": len(run), "start": run[0]["start"], "end": run[-1]["end"]}
        text = " ".join(s["text"] for s in sentences)
        if options.listen.diarize:
            paragraph["speaker"] = run[0]["speaker"]
            text = f"Speaker {run[0]['speaker']}: {text}"
        paragraphs.append(paragraph)
        texts.append(text)
    return {"transcript": "".join("\n" + t + "\n" for t in texts).rstrip("\n") if texts else "",
            "paragraphs": paragraphs}
