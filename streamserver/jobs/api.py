"""HTTP for files: OpenAI's `POST /v1/audio/transcriptions` and the `/jobs` API (contract section 5);
`transcribe_now` is the synchronous path Deepgram's pre-recorded `POST /v1/listen` shares.

Uploads go into the jobs folder as they arrive, and reading stops at `--max-upload-mb`
(upload.py); the file is decoded once up front so a bad file is a 400 with the decoder's
reason before any job exists.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..ops.auth import require_token
from .file_audio import SAMPLE_RATE, FileDecodeError, decode_file, with_speakers
from .runner import JobRunner
from .formats import FORMATS, render
from .upload import receive_upload


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class SyncJobFailed(Exception):
    """A synchronous transcription's job failed (or was deleted) before its words were in."""


async def audio_seconds(path: Path) -> float:
    """The file's duration in seconds, decoding it once; FileDecodeError (the file removed) if it is not audio."""
    try:
        audio = await asyncio.to_thread(decode_file, str(path))
    except FileDecodeError:
        path.unlink(missing_ok=True)
        raise
    return len(audio) / SAMPLE_RATE


async def transcribe_now(runner: JobRunner, path: Path, language: str | None, prompt: str | None = None,
                         diarization: bool = False) -> tuple[list[dict], list[tuple[float, float, int]] | None]:
    """A file transcribed while the client waits, as a job through the runner (the devices' file lane):
    its words and, with `diarization`, its speaker turns. The job is gone afterwards; if the client goes
    away first, it is cancelled and deleted. SyncJobFailed: the job failed."""
    job = await runner.db(runner.store.create, path, language, prompt, diarization)
    runner.wake()
    try:
        done = await runner.wait_done(job.id)
    except asyncio.CancelledError:  # the client went away: its job goes too
        runner.cancel(job.id)
        await asyncio.shield(runner.db(runner.store.delete, job.id))
        raise
    if done is None or done.status != "done":
        raise SyncJobFailed(done.error if done else "job deleted")
    words = await runner.db(runner.store.words, job.id)
    turns = await runner.db(runner.store.turns, job.id) if diarization else None
    await runner.db(runner.store.delete, job.id)
    return words, turns


async def _check_audio(path: Path) -> float | JSONResponse:
    """The file's duration in seconds, or the 400 answer with the decoder's reason."""
    try:
        return await audio_seconds(path)
    except FileDecodeError as exc:
        return _error(str(exc), 400)


async def _accept_file(request: Request) -> tuple[Path, dict, float] | JSONResponse:
    """The upload saved and decoded once: (path, form fields, seconds of audio), or the error answer."""
    received = await receive_upload(request)
    if isinstance(received, JSONResponse):
        return received
    path, fields = received
    seconds = await _check_audio(path)
    if isinstance(seconds, JSONResponse):
        return seconds
    return path, fields, seconds


@require_token
async def openai_transcriptions(request: Request) -> Response:
    accepted = await _accept_file(request)
    if isinstance(accepted, JSONResponse):
        return accepted
    path, fields, seconds = accepted
    fmt = fields.get("response_format", "json")
    if fmt not in FORMATS:
        path.unlink(missing_ok=True)
        return _error(f"response_format must be one of {', '.join(FORMATS)}", 400)
    server = request.app.state.server
    if seconds > server.config.sync_max_seconds:
        path.unlink(missing_ok=True)
        return _error(f"The file is {seconds:.0f} s of audio, over --sync-max-seconds "
                      f"({server.config.sync_max_seconds:g} s): submit it to POST /jobs", 413)
    try:
        words, _ = await transcribe_now(server.jobs, path, fields.get("language") or None, fields.get("prompt"))
    except SyncJobFailed as exc:
        return _error(f"Transcription failed: {exc}", 500)
    body, media = render(words, fmt, duration=round(seconds, 2), language=fields.get("language"),
                         with_words="word" in fields["timestamp_granularities"])
    return Response(body, media_type=media)


@require_token
async def create_job(request: Request) -> Response:
    accepted = await _accept_file(request)
    if isinstance(accepted, JSONResponse):
        return accepted
    path, fields, _ = accepted
    runner: JobRunner = request.app.state.server.jobs
    job = await runner.db(runner.store.create, path, fields.get("language") or None, None,
                          fields.get("diarization", "").lower() == "true")
    runner.wake()
    return JSONResponse({"id": job.id, "status": job.status}, status_code=202)


@require_token
async def list_jobs(request: Request) -> Response:
    status = request.query_params.get("status")
    runner: JobRunner = request.app.state.server.jobs
    return JSONResponse({"jobs": [j.public() for j in await runner.db(runner.store.list, status)]})


@require_token
async def job_status(request: Request) -> Response:
    runner: JobRunner = request.app.state.server.jobs
    job = await runner.db(runner.store.get, request.path_params["job_id"])
    if job is None:
        return _error("Unknown job", 404)
    return JSONResponse(job.public())


@require_token
async def job_result(request: Request) -> Response:
    runner: JobRunner = request.app.state.server.jobs
    job = await runner.db(runner.store.get, request.path_params["job_id"])
    if job is None:
        return _error("Unknown job", 404)
    if job.status != "done":
        return _error(f"Job is {job.status}", 409)
    fmt = request.query_params.get("format", "json")
    if fmt not in ("json", "text", "srt", "vtt", "rttm"):
        return _error("format must be json, text, srt, vtt or rttm", 400)
    words = await runner.db(runner.store.words, job.id)
    turns = await runner.db(runner.store.turns, job.id)
    speakers = None
    if turns is not None:
        words, speakers = with_speakers(words, turns) if turns else (words, [])
    elif fmt == "rttm":
        return _error("rttm needs a job with diarization=true", 400)
    body, media = render(words, "verbose_json" if fmt == "json" else fmt, duration=job.audio_seconds,
                         language=job.language, speakers=speakers, name=job.id)
    return Response(body, media_type=media)


@require_token
async def delete_job(request: Request) -> Response:
    runner: JobRunner = request.app.state.server.jobs
    job = await runner.db(runner.store.delete, request.path_params["job_id"])
    if job is None:
        return _error("Unknown job", 404)
    runner.cancel(job.id)
    return Response(status_code=204)


def jobs_routes() -> list[Route]:
    return [
        Route("/v1/audio/transcriptions", openai_transcriptions, methods=["POST"]),
        Route("/jobs", create_job, methods=["POST"]),
        Route("/jobs", list_jobs, methods=["GET"]),
        Route("/jobs/{job_id}", job_status, methods=["GET"]),
        Route("/jobs/{job_id}", delete_job, methods=["DELETE"]),
        Route("/jobs/{job_id}/result", job_result, methods=["GET"]),
    ]

