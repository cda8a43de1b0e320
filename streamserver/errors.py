"""Failures that end one connection, each with the close code and reason the contract gives.

Raising one of these anywhere in a connection's pipeline ends that connection
(error message, then close) and nothing else.
"""
from __future__ import annotations


class ConnectionFailure(Exception):
    """Base: `code` is the WebSocket close code, `message` the error text sent to the client."""

    code: int = 1011

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotBinary(ConnectionFailure):
    code = 1003

    def __init__(self) -> None:
        super().__init__("Expected binary audio frames")


class DecodeFailed(ConnectionFailure):
    code = 1007

    def __init__(self, detail: str) -> None:
        super().__init__(f"Audio decode error: {detail}")


class FrameTooLarge(ConnectionFailure):
    code = 1009

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"Frame too large: {size} bytes (limit {limit})")


class GpuOutOfMemory(ConnectionFailure):
    code = 1011

    def __init__(self, gpu_id: int, detail: str = "") -> None:
        super().__init__(f"GPU memory full on GPU {gpu_id}" + (f": {detail}" if detail else ""))


class ModelLoadFailed(ConnectionFailure):
    code = 1011

    def __init__(self, gpu_id: int, detail: str = "") -> None:
        super().__init__(f"Model load failed on GPU {gpu_id}" + (f": {detail}" if detail else ""))


class ShuttingDown(ConnectionFailure):
    """The drain's grace period ran out before this stream's last update could be sent."""

    code = 1001

    def __init__(self) -> None:
        super().__init__(SHUTTING_DOWN)


class InternalError(ConnectionFailure):
    code = 1011

    def __init__(self) -> None:
        super().__init__("Internal server error")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (or host) out-of-memory errors, however torch spells them."""
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


# Close reasons for refusals before admission (no config message is sent).
REFUSED_ORIGIN = "Origin not allowed"  # 1008
REFUSED_UNAUTHORIZED = "Unauthorized"  # 1008 (and the HTTP 401 body)
REFUSED_DRAINING = "Server is draining"  # 1001
REFUSED_FULL = "No GPU resources available"  # 1008
UNKNOWN_SESSION = "Unknown or expired session"  # 1008: a resume token that opens nothing

# The close reason (1001) of a stream ended by the drain.
SHUTTING_DOWN = "Server shutting down"
