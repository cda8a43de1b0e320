"""Server configuration: the one global thing, built once from flags and environment."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "tiny.en"
    language: str | None = None  # None: 'en' for .en models, else 'auto'
    pcm_input: bool = False
    policy: str = "localagreement"
    diarization: bool = False
    diarization_backend: str = "sortformer"
    sortformer_model: str | None = None
    sortformer_latency: str = "1s"
    max_connections_per_gpu: int | str = 4
    gpu_memory_fraction: float = 0.9
    gpus: tuple[int, ...] | None = None
    simulate_gpus: str | None = None
    idle_unload_seconds: float = 120.0
    silence_line_seconds: float = 2.0
    max_frame_bytes: int = 1048576
    api_token: str | None = None
    allowed_origins: tuple[str, ...] | None = None
    drain_seconds: float = 30.0
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    log_level: str = "info"
    cache_dir: str | None = None
    refuse_when_full: str = "close"  # close: upgrade, then 1008; http: 503 + Retry-After before the upgrade
    jobs_db: str = ""  # "": the user's data folder (`default_jobs_db`)
    job_lease_seconds: float = 30.0  # a server that stops renewing loses its chunks to the others after this
    max_upload_mb: float = 500.0
    request_timeout: float = 30.0  # a request head or body that stops arriving: 408 after this
    resume_seconds: float = 30.0  # a dropped /asr stream waits this long for its client (0: never)
    max_updates_per_second: float = 4.0  # caption updates per socket, at most (the newest state is kept)
    max_viewers_per_stream: int = 100  # read-only viewers of one /asr stream (/asr/watch/<id>)
    sync_max_seconds: float = 120.0
    max_batch: int = 32  # streams per batched Whisper call
    trim_seconds: float = 15.0  # LocalAgreement cuts a buffer longer than this at a committed clause end
    # N: a live LocalAgreement buffer is padded to 15 s and grown in steps of N s past that
    # (backends/batched_whisper.py MIN_WINDOW_SECONDS); its decodes are checked by the next one. An
    # utterance's last decode, its ending check, AlignAtt and files keep 30-s windows, as Whisper was
    # trained. The encoder costs under a half and the real-speech set's pooled WER of `localagreement`
    # went down, not up (README). 0: every window is 30 s.
    bucket_seconds: float = 5.0
    # An utterance's last decode, committed with no second hypothesis, searches this many hypotheses
    # (backends/final_search.py). 1: greedy, as openai-whisper's `transcribe` decodes by default. 5 keeps
    # unsure last words greedy drops, but on the hoarse voice of the real-speech set it also chose fluent
    # invented phrases, and each search costs one to three greedy decodes of the buffer (README).
    final_beam_size: int = 1

    @property
    def effective_language(self) -> str:
        if self.language:
            return self.language
        return "en" if self.model.endswith(".en") else "auto"

    @property
    def default_format(self) -> str:
        return "pcm" if self.pcm_input else "auto"

    @property
    def model_label(self) -> str:
        """The model as clients see it: the name, or the file/folder's base name for a path."""
        import os

        return os.path.basename(self.model.rstrip("/")) or self.model


def default_jobs_db() -> str:
    """Where the file jobs live unless `--jobs-db` says otherwise: the user's data folder
    (`$XDG_DATA_HOME/streamserver/jobs.sqlite`, else `~/.local/share/streamserver/jobs.sqlite`), not
    the folder the server was started from. Nothing is created there before the first job."""
    root = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(root, "streamserver", "jobs.sqlite")
