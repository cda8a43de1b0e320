"""How the inference threads wait between operations.

PyTorch's CPU operators run on an OpenMP pool (GNU libgomp in the PyPI wheels). By default a
worker that finishes its share of an operator spins for a while before it sleeps, so that the
next operator starts without a wake-up; a streaming round is hundreds of small operators with
Python and the other stages in between, so the workers spin through much of the round and the
process pays for a core it does not use. Measured on the real-speech set through a session in
process (tiny.en, 2-core CPU, one stream): 0.262 CPU-s per audio second spinning, 0.210 with
passive waits, wall time 0.302 against 0.315 s per audio second. On a shared host the spinning
also takes cores from the other streams' rounds and from the event loop.
"""
from __future__ import annotations

import os
import sys


def passive_waits() -> bool:
    """Ask OpenMP's idle workers to sleep at once (`OMP_WAIT_POLICY=PASSIVE`) unless the operator
    chose a policy. It is read when the OpenMP runtime loads, with torch: False when torch is
    already imported (too late to apply) or the variable was set."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
