"""zeroserve: a low-latency LLM and tensor inference server built as a ZeroMQ pipeline.

Importing this package starts nothing: no sockets, no logging setup, no torch.
"""

from zeroserve.client import AsyncClient, Chunk, Client, Result
from zeroserve.errors import (
    BadRequestError,
    BusyError,
    CancelledError,
    InternalError,
    RequestTimeoutError,
    ShmUnreachableError,
    UnavailableError,
    UnknownModelError,
    WorkerLostError,
    ZeroserveError,
)

__all__ = [
    "AsyncClient",
    "BadRequestError",
    "BusyError",
    "CancelledError",
    "Chunk",
    "Client",
    "InternalError",
    "RequestTimeoutError",
    "ShmUnreachableError",
    "Result",
    "UnavailableError",
    "UnknownModelError",
    "WorkerLostError",
    "ZeroserveError",
]
__version__ = "0.1.0"
