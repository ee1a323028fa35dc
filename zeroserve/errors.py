"""The SDK's exception hierarchy; each protocol error code maps to one class.

    ZeroserveError
    ├── BadRequestError        BAD_REQUEST
    │   └── ShmUnreachableError  SHM_UNREACHABLE (the SDK resends as frames by itself)
    ├── UnknownModelError      UNKNOWN_MODEL
    ├── BusyError              BUSY
    ├── WorkerLostError        WORKER_LOST
    ├── RequestTimeoutError    TIMEOUT (also raised by the SDK's own timeout)
    ├── CancelledError         CANCELLED
    ├── InternalError          INTERNAL
    └── UnavailableError       UNAVAILABLE (no broker or no worker reachable)
"""

from __future__ import annotations

from zeroserve import protocol


class ZeroserveError(Exception):
    code = protocol.INTERNAL

    def __init__(self, message: str = "", request_id: str | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.request_id = request_id


class BadRequestError(ZeroserveError):
    code = protocol.BAD_REQUEST


class ShmUnreachableError(BadRequestError):
    code = protocol.SHM_UNREACHABLE


class UnknownModelError(ZeroserveError):
    code = protocol.UNKNOWN_MODEL


class BusyError(ZeroserveError):
    code = protocol.BUSY


class WorkerLostError(ZeroserveError):
    code = protocol.WORKER_LOST


class RequestTimeoutError(ZeroserveError):
    code = protocol.TIMEOUT


class CancelledError(ZeroserveError):
    code = protocol.CANCELLED


class InternalError(ZeroserveError):
    code = protocol.INTERNAL


class UnavailableError(ZeroserveError):
    code = protocol.UNAVAILABLE


BY_CODE: dict[str, type[ZeroserveError]] = {
    cls.code: cls
    for cls in (
        BadRequestError, ShmUnreachableError, UnknownModelError, BusyError, WorkerLostError,
        RequestTimeoutError, CancelledError, InternalError, UnavailableError,
    )
}


def from_code(code: str, message: str, request_id: str | None = None) -> ZeroserveError:
    return BY_CODE.get(code, InternalError)(message, request_id)
