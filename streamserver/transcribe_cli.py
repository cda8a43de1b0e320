"""`streamserver transcribe FILE`: upload a file to a running server's /jobs, show progress, print the result.

Progress bars (tqdm) go to stderr, the transcript to stdout, so the output can be
redirected into a file. Exit status: 0 done, 1 refused/failed/unreachable.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence

import httpx
from tqdm import tqdm

from .ops.ctl import DEFAULT_URL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamserver transcribe", description=__doc__)
    p.add_argument("file")
    p.add_argument("--url", default=os.environ.get("STREAMSERVER_URL", DEFAULT_URL))
    p.add_argument("--token", default=os.environ.get("STREAMSERVER_TOKEN") or os.environ.get("STREAMSERVER_API_TOKEN"))
    p.add_argument("--format", default="text", choices=("json", "text", "srt", "vtt"))
    p.add_argument("--language")
    return p


def _multipart(path: str, boundary: str, fields: dict[str, str], bar: tqdm) -> Iterator[bytes]:
    for name, value in fields.items():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    name = os.path.basename(path).replace('"', "")
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            bar.update(len(block))
            yield block
    yield f"\r\n--{boundary}--\r\n".encode()


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    base = args.url.rstrip("/")
    try:
        size = os.path.getsize(args.file)
        boundary = uuid.uuid4().hex
        fields = {"language": args.language} if args.language else {}
        with tqdm(total=size, unit="B", unit_scale=True, desc="upload", file=sys.stderr) as bar:
            r = httpx.post(f"{base}/jobs", content=_multipart(args.file, boundary, fields, bar), timeout=600,
                           headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
        if r.status_code != 202:
            print(f"streamserver transcribe: {r.status_code} {r.json().get('error', r.text)}", file=sys.stderr)
            return 1
        job_id = r.json()["id"]
        with tqdm(total=100, unit="%", desc="transcribe", file=sys.stderr) as bar:
            while True:
                status = httpx.get(f"{base}/jobs/{job_id}", headers=headers, timeout=30).json()
                bar.update(round(100 * status["progress"]) - bar.n)
                bar.set_postfix_str(status["status"])
                if status["status"] in ("done", "failed"):
                    break
                time.sleep(0.5)
        if status["status"] == "failed":
            print(f"streamserver transcribe: job failed: {status['error']}", file=sys.stderr)
            return 1
        result = httpx.get(f"{base}/jobs/{job_id}/result", params={"format": args.format}, headers=headers, timeout=60)
        sys.stdout.write(result.text if result.text.endswith("\n") else result.text + "\n")
        return 0
    except (OSError, httpx.HTTPError) as exc:
        print(f"streamserver transcribe: {exc}", file=sys.stderr)
        return 1
