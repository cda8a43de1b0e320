"""Where one stream's step spends its time: a Session fed 100-ms chunks, each step profiled.

    python bench/profile_session.py --model tiny.en --audio speech.wav [--device cuda:0]

Builds the device's models as the server does, feeds the audio to one Session
chunk by chunk (as fast as the steps run, not at real-time pace), drives each
step with the shared ASR, and prints step times and cProfile's top functions.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends.asr_types import drive  # noqa: E402
from bench.load_client import load_pcm16k  # noqa: E402
from bench.metrics import percentile  # noqa: E402
from gpu_manager import Device  # noqa: E402
from streamserver.config import ServerConfig  # noqa: E402
from streamserver.engine.models import make_loader  # noqa: E402
from streamserver.live.session import AudioInbox, Session, answer_directly  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--audio", required=True)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunk-ms", type=int, default=100)
    args = ap.parse_args()
    gpu = int(args.device.split(":")[1]) if args.device.startswith("cuda") else 0
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    device = Device(id=gpu, torch_device=args.device, total_bytes=0, kind=kind, name=args.device)
    models = make_loader(ServerConfig(model=args.model))(device)
    pcm = np.frombuffer(load_pcm16k(args.audio), "<i2").astype(np.float32) / 32768
    step = 16 * args.chunk_ms
    times, profile = [], cProfile.Profile()
    for run in range(2):  # the first pass warms up
        inbox = AudioInbox()
        session = Session(inbox, models)
        times = []
        if run:
            profile.enable()
        for off in range(0, len(pcm), step):
            inbox.put(pcm[off:off + step])
            t0 = time.perf_counter()
            state = drive(session.step(), answer_directly(models))
            times.append(time.perf_counter() - t0)
        state = drive(session.finish(), answer_directly(models))
        profile.disable()
    print(f"{args.device}: {len(times)} steps, p50 {percentile(times, 0.5) * 1e3:.1f} ms, "
          f"p95 {percentile(times, 0.95) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms, total {sum(times):.2f} s")
    print("text:", " ".join(line.text for line in state.lines))
    pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
