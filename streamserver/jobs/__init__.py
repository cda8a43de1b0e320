"""File transcription jobs: the store (SQLite), the runner (chunks through the device scheduler's
second class), the HTTP API (`/jobs`, `/v1/audio/transcriptions`), the result formats, and the
file-side audio work (decoding, cutting at pauses, speaker turns)."""
