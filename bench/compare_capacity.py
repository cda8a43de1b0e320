"""Our capacity beside WhisperLiveKit's, on the same machine, audio and weights, from one command.

    python bench/compare_capacity.py --theirs "/path/to/wlk-venv/bin/whisperlivekit-server \\
        --model_dir TINY_EN_CT2_FOLDER --pcm-input --port {port} ..." [--lag-limit 3.0]

Streams a real recording (default: the LibriSpeech clip in bench/clips, `--audio` and
`--reference` for another), then for each server in turn: starts it (`{port}` in a command is replaced by a free
port), waits for it to listen, runs the capacity sweep of bench/capacity.py
(N = 1, 2, 4, ... real-time streams of PCM until p95 caption lag reaches
--lag-limit or mean WER leaves the single-stream WER by more than 5 points), stops it. Prints both capacities and their ratio. Our server runs
`streamserver --pcm-input` with each policy unless --ours says otherwise.
"""
from __future__ import annotations

import argparse
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.capacity import CLIP, CLIP_TEXT, sweep  # noqa: E402
from bench.load_client import load_pcm16k  # noqa: E402

OURS = "streamserver --pcm-input --port {port} --max-connections-per-gpu 64"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, command: str, pcm: bytes, reference: str, args: argparse.Namespace) -> int:
    port = free_port()
    argv = shlex.split(command.replace("{port}", str(port)))
    print(f"\n== {name}: {' '.join(argv)}", flush=True)
    log = open(Path(tempfile.gettempdir()) / f"capacity-{name}.log", "w")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + args.start_timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"{name} exited with {server.returncode}; see {log.name}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"{name} did not listen on port {port} within {args.start_timeout:.0f} s")
        return sweep(f"ws://127.0.0.1:{port}/asr", pcm, reference, args.max_streams, args.lag_limit)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", action="append",
                    help="our server command ({port} is filled in); repeat to compare several settings "
                         "(default: --policy localagreement and --policy alignatt)")
    ap.add_argument("--theirs", required=True, help="WhisperLiveKit's server command ({port} is filled in)")
    ap.add_argument("--lag-limit", type=float, default=3.0)
    ap.add_argument("--max-streams", type=int, default=32)
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--audio", default=str(CLIP), help="a real recording (default: the shipped LibriSpeech clip)")
    ap.add_argument("--reference", default=CLIP_TEXT, help="its transcript")
    args = ap.parse_args()
    pcm = load_pcm16k(args.audio)
    ours_commands = args.ours or [f"{OURS} --policy {policy}" for policy in ("localagreement", "alignatt")]
    theirs = measure("whisperlivekit", args.theirs, pcm, args.reference, args)
    results = [(command, measure("streamserver", command, pcm, args.reference, args)) for command in ours_commands]
    print(f"\ncapacity at p95 lag < {args.lag_limit:.1f} s (real-time streams):")
    print(f"  WhisperLiveKit: {theirs}   ({args.theirs})")
    for command, ours in results:
        ratio = f"{ours / theirs:.1f}x" if theirs else ("inf (theirs holds none)" if ours else "n/a")
        print(f"  streamserver:   {ours}   ratio {ratio}   ({command})")


if __name__ == "__main__":
    main()
