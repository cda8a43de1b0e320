"""`streamserver` on the command line: flags (or STREAMSERVER_* variables) → config → uvicorn.

`streamserver status` and `streamserver models ...` are the operator's client (ctl.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .ops import ctl
from .config import ServerConfig

if TYPE_CHECKING:
    from .engine.runtime import ModelLoader

ENV_PREFIX = "STREAMSERVER_"


def _csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _max_conn(text: str) -> int | str:
    if text == "auto":
        return "auto"
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# (field, type or 'bool', help)
FLAGS: list[tuple[str, object, str]] = [
    ("host", str, "address to bind"),
    ("port", int, "port"),
    ("model", str, "Whisper model name, openai-whisper .pt checkpoint, or CTranslate2 folder"),
    ("language", str, "language for multilingual models (default: en for .en models, else auto)"),
    ("pcm_input", "bool", "connections without format= send raw PCM s16le 16 kHz mono"),
    ("policy", str, "streaming policy: localagreement or alignatt"),
    ("diarization", "bool", "label speakers"),
    ("diarization_backend", str, "sortformer or embedding"),
    ("sortformer_model", str, "a .nemo file or NeMo model name"),
    ("sortformer_latency", str, "streaming preset"),
    ("max_connections_per_gpu", _max_conn, "connections per device: a number, or auto (from the measured memory per stream)"),
    ("gpu_memory_fraction", float, "share of each GPU's memory the server may plan to use"),
    ("gpus", _csv_ints, "comma-separated device ids to use"),
    ("simulate_gpus", str, "NxG: N simulated devices of G GB each, models on the CPU"),
    ("idle_unload_seconds", float, "unload a device's models after this long with no connection (0: never)"),
    ("silence_line_seconds", float, "silence long enough to become a -2 line"),
    ("max_frame_bytes", int, "largest binary frame accepted"),
    ("api_token", str, "required token for /asr and admin endpoints"),
    ("allowed_origins", _csv, "comma-separated browser origins accepted"),
    ("drain_seconds", float, "grace period after SIGTERM"),
    ("ssl_certfile", str, "serve https:// and wss://"),
    ("ssl_keyfile", str, "key for --ssl-certfile"),
    ("log_level", str, "logging level"),
    ("cache_dir", str, "where converted model checkpoints are cached"),
    ("refuse_when_full", str, "close (upgrade, then close 1008) or http (answer the upgrade with 503 and "
                              "Retry-After, so a proxy can try another server)"),
    ("jobs_db", str, "the file-transcription job queue: a SQLite file, created on the first job "
                     "(default: $XDG_DATA_HOME/streamserver/jobs.sqlite), or a postgresql:// URL that "
                     "several servers share"),
    ("job_lease_seconds", float, "how long a server's claim on a file chunk lasts without its heartbeat: "
                                 "the chunks of a server that died go to the others after this"),
    ("resume_seconds", float, "how long a dropped /asr stream is kept (its slot held) for its client to "
                              "resume with its token (0: never)"),
    ("max_updates_per_second", float, "caption updates sent per socket at most (the newest state waits for "
                                      "the next one; 0: no limit)"),
    ("max_viewers_per_stream", int, "read-only viewers of one /asr stream (its config's viewer_url); over it "
                                    "a viewer is closed with 1013"),
    ("request_timeout", float, "an HTTP request whose head has not all arrived, or whose body has sent "
                               "nothing, after this many seconds gets 408 and is closed"),
    ("max_upload_mb", float, "largest file accepted by /jobs, /v1/audio/transcriptions and POST /v1/listen"),
    ("sync_max_seconds", float, "longest audio /v1/audio/transcriptions and POST /v1/listen answer at once (else /jobs)"),
    ("max_batch", int, "most streams in one batched Whisper call (a round with more runs several)"),
    ("trim_seconds", float, "cut a transcription buffer longer than this at its last committed clause end"),
    ("bucket_seconds", float, "a live LocalAgreement buffer's encoder window is at least 15 s and grows in "
                                "steps of this many seconds (0: always 30 s)"),
    ("final_beam_size", int, "an utterance's last decode, committed with no second hypothesis, searches "
                             "this many hypotheses (1: greedy; 5: fewer lost last words, each search "
                             "about one to three greedy decodes that its round waits for)"),
]


def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="streamserver", description="Live speech transcription over WebSockets",
        epilog="Subcommands for a running server: streamserver status [--url URL] [--token T]; "
               "streamserver models load|unload --gpu N [--url URL] [--token T]; "
               "streamserver transcribe FILE [--url URL] [--format text|json|srt|vtt]",
    )
    for name, kind, help_text in FLAGS:
        env = ENV_PREFIX + name.upper()
        if kind == "bool":
            env_on = os.environ.get(env, "").lower() in ("1", "true", "yes", "on")
            parser.add_argument(_flag(name), action="store_true", default=env_on or getattr(defaults, name),
                                help=f"{help_text} (env {env})")
            continue
        default = getattr(defaults, name)
        if env in os.environ:
            default = kind(os.environ[env])  # type: ignore[operator]
        parser.add_argument(_flag(name), type=kind, default=default, help=f"{help_text} (env {env}; default {default})")
    return parser


def parse_config(argv: Sequence[str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(argv)
    return ServerConfig(**{name: getattr(args, name) for name, _, _ in FLAGS})


# After the drain: how long uvicorn waits for leftover tasks before cancelling them.
SHUTDOWN_BACKSTOP_SECONDS = 5.0


def serve(config: ServerConfig, loader: ModelLoader | None = None) -> None:
    """Serve until SIGTERM has drained the streams (exit 0) or SIGINT stops it. `loader`: models (tests: fakes)."""
    from .ops import threads

    threads.passive_waits()  # before torch loads its OpenMP runtime
    import uvicorn

    from .app import create_app
    from .edge import protocol_with_timeout, websocket_protocol
    from .ops import heap
    from .ops.drain import GracefulServer

    heap.bound_heaps()

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(config, loader)
    except ValueError as exc:  # a flag the server cannot honour: say which, no traceback
        sys.exit(f"streamserver: error: {exc}")
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        ws_max_size=max(16 * 2**20, 4 * config.max_frame_bytes),
        ssl_certfile=config.ssl_certfile,
        ssl_keyfile=config.ssl_keyfile,
        timeout_graceful_shutdown=SHUTDOWN_BACKSTOP_SECONDS,
        http=protocol_with_timeout(config.request_timeout),
        ws=websocket_protocol(),
    )
    server = GracefulServer(uv_config, app.state.server.drain, config.drain_seconds)
    server.run()
    if not server.started:
        sys.exit(3)  # as uvicorn.run: the port was taken, or startup failed


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ctl.COMMANDS:
        sys.exit(ctl.main(args))
    if args and args[0] == "transcribe":
        from . import transcribe_cli

        sys.exit(transcribe_cli.main(args[1:]))
    serve(parse_config(args))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
