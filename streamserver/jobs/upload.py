"""Reading an upload (contract section 5): the multipart form's `file`, written into the jobs folder as
the body arrives, and its other fields; or (`receive_body`, Deepgram's pre-recorded API) a body that is
the file itself, under the same limit.

The body is read from `request.stream()` and counted as it comes: past `--max-upload-mb` (the
file) or that plus `FORM_SLACK` (the whole body: the multipart framing and the small fields beside
the file) reading stops and the answer is 413 at once, whether or not the client sent a
Content-Length. Nothing is spooled elsewhere first: python-multipart's streaming parser hands over
the file's bytes, which go straight to their file in the jobs folder (written in blocks, off the
event loop), and that file is removed again on any refusal.
"""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import BinaryIO

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

try:
    import python_multipart as multipart
    from python_multipart.multipart import parse_options_header
except ModuleNotFoundError:  # pragma: no cover - python-multipart < 0.0.13 had only this name
    import multipart  # type: ignore[no-redef]
    from multipart.multipart import parse_options_header  # type: ignore[no-redef]

FORM_SLACK = 64 * 1024  # the multipart framing and the small fields beside the file
MAX_FIELDS = 32
WRITE_BLOCK = 1 << 20  # file bytes gathered before one write to disk
NOT_MULTIPART = "The upload must be multipart/form-data with a 'file' field"


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class UploadRefused(Exception):
    """An upload refused: the HTTP status and the reason (the caller shapes the answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _limit(request: Request) -> tuple[int, str]:
    """`--max-upload-mb` in bytes, and the answer to a file over it."""
    max_mb = request.app.state.server.config.max_upload_mb
    return int(max_mb * 2**20), f"File too large: over --max-upload-mb ({max_mb:g} MB)"


class _Form:
    """python-multipart's callbacks: the `file` part's bytes gathered for writing, the other parts as text."""

    def __init__(self, file_limit: int, too_large: str) -> None:
        self.file_limit = file_limit
        self.too_large = too_large
        self.fields: list[tuple[str, str]] = []
        self.file_seen = False
        self.filename = ""
        self.file_bytes = 0
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.ended = False
        self._field_bytes = 0
        self._name = ""
        self._in_file = False
        self._data = bytearray()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_end": self.on_end}

    def take(self) -> bytes:
        block = b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        return block

    def on_part_begin(self) -> None:
        self._name, self._in_file, self._disposition = "", False, b""
        self._data = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise UploadRefused(400, 'Every form part needs a name (Content-Disposition: form-data; name="...")')
        self._name = options[b"name"].decode("utf-8", "replace")
        if self._name == "file":
            if self.file_seen:
                raise UploadRefused(400, "Only one 'file' per upload")
            self.file_seen, self._in_file = True, True
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        elif b"filename" in options:
            raise UploadRefused(400, f"A file in the field '{self._name}': the audio goes in the 'file' field")
        elif len(self.fields) >= MAX_FIELDS:
            raise UploadRefused(400, f"More than {MAX_FIELDS} fields in the form")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.file_bytes += end - start
            if self.file_bytes > self.file_limit:
                raise UploadRefused(413, self.too_large)
            self.pending.append(data[start:end])
            self.pending_bytes += end - start
        else:
            self._field_bytes += end - start
            if self._field_bytes > FORM_SLACK:
                raise UploadRefused(413, "The form's fields are too large")
            self._data += data[start:end]

    def on_part_end(self) -> None:
        if not self._in_file:
            self.fields.append((self._name, self._data.decode("utf-8", "replace")))

    def on_end(self) -> None:
        self.ended = True


async def receive_upload(request: Request) -> tuple[Path, dict] | JSONResponse:
    """Save the form's `file` into the jobs folder; the other fields as a dict. Or the error answer."""
    server = request.app.state.server
    limit, too_large = _limit(request)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + FORM_SLACK:
        return _error(too_large, 413)
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        return _error(NOT_MULTIPART, 400)

    form = _Form(limit, too_large)
    parser = multipart.MultipartParser(options[b"boundary"], form.callbacks())
    target: Path | None = None
    out: BinaryIO | None = None
    received = 0
    body = request.stream()
    try:
        async for chunk in body:
            received += len(chunk)
            if received > limit + FORM_SLACK:
                raise UploadRefused(413, too_large)  # stop reading here: the rest is never written anywhere
            parser.write(chunk)
            if form.file_seen and out is None:
                target = server.jobs.uploads / (uuid.uuid4().hex + Path(form.filename).suffix[:10])
                out = await asyncio.to_thread(open, target, "wb")
            if out is not None and form.pending_bytes >= WRITE_BLOCK:
                await asyncio.to_thread(out.write, form.take())
        parser.finalize()
        if not form.ended:
            raise UploadRefused(400, "Could not read the upload: the body ended inside the multipart form")
        if out is None:
            raise UploadRefused(400, "Missing 'file' in the multipart form")
        await asyncio.to_thread(out.write, form.take())
    except UploadRefused as refused:
        return _discard(out, target, _error(refused.message, refused.status))
    except ClientDisconnect:  # the client went away (or stalled, and the edge answered 408): nobody to answer
        return _discard(out, target, _error("The upload was interrupted", 400))
    except Exception as exc:  # noqa: BLE001 - a malformed body is the client's
        return _discard(out, target, _error(f"Could not read the upload: {exc}", 400))
    finally:
        await body.aclose()
    await asyncio.to_thread(out.close)
    assert target is not None
    fields: dict = dict(form.fields)
    fields["timestamp_granularities"] = [v for k, v in form.fields if k.startswith("timestamp_granularities")]
    return target, fields


def _discard(out: BinaryIO | None, target: Path | None, answer: JSONResponse | None) -> JSONResponse | None:
    if out is not None:
        out.close()
    if target is not None:
        target.unlink(missing_ok=True)
    return answer


async def receive_body(request: Request, prefix: bytes = b"") -> tuple[Path, int, str]:
    """A request body that is the file itself (Deepgram's pre-recorded upload), written into the jobs
    folder as it arrives, after `prefix` (a header the caller puts before raw samples), under the same
    `--max-upload-mb` limit as a form's file: (path, body bytes, the body's sha256). UploadRefused: too
    large (413), empty or interrupted (400); nothing is left on disk then."""
    import hashlib

    server = request.app.state.server
    limit, too_large = _limit(request)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise UploadRefused(413, too_large)
    target = server.jobs.uploads / (uuid.uuid4().hex + ".audio")
    out = await asyncio.to_thread(open, target, "wb")
    digest = hashlib.sha256()
    received = 0
    pending: list[bytes] = [prefix] if prefix else []
    pending_bytes = len(prefix)
    body = request.stream()
    try:
        async for chunk in body:
            received += len(chunk)
            if received > limit:
                raise UploadRefused(413, too_large)  # stop reading here: the rest is never written anywhere
            digest.update(chunk)
            pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= WRITE_BLOCK:
                await asyncio.to_thread(out.write, b"".join(pending))
                pending, pending_bytes = [], 0
        if not received:
            raise UploadRefused(400, "The request body is empty: send the audio file as the body")
        await asyncio.to_thread(out.write, b"".join(pending))
    except UploadRefused:
        _discard(out, target, None)
        raise
    except ClientDisconnect:
        _discard(out, target, None)
        raise UploadRefused(400, "The upload was interrupted") from None
    finally:
        await body.aclose()
    await asyncio.to_thread(out.close)
    return target, received, digest.hexdigest()
