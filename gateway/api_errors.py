"""The gateway's errors in OpenAI's shape, and the map from SDK errors to HTTP statuses."""

from __future__ import annotations

import logging
from typing import Any

from zeroserve import errors
from zeroserve.logs import RateLimitedLog

log = RateLimitedLog(logging.getLogger("zeroserve.gateway"))  # internal errors: no floods


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def from_zeroserve(exc: errors.ZeroserveError) -> ApiError:
    """Map an SDK error onto an HTTP status and OpenAI error type."""
    table: dict[type, tuple[int, str, dict[str, str]]] = {
        errors.BadRequestError: (400, "invalid_request_error", {}),
        errors.UnknownModelError: (404, "invalid_request_error", {}),
        errors.BusyError: (503, "server_overloaded", {"Retry-After": "1"}),
        errors.UnavailableError: (503, "service_unavailable", {"Retry-After": "1"}),
        errors.WorkerLostError: (502, "worker_lost", {}),
        errors.RequestTimeoutError: (504, "timeout", {}),
        errors.CancelledError: (499, "cancelled", {}),
    }
    status, type_, headers = table.get(type(exc), (500, "internal_error", {}))
    code = "model_not_found" if isinstance(exc, errors.UnknownModelError) else exc.code.lower()
    message = exc.message
    if status == 500:  # the detail is for operators (the log), not for clients
        log.warning("request %s failed inside the server: %s", exc.request_id, message)
        message = f"internal error (request id {exc.request_id})"
    return ApiError(status, message, type_, code, headers=headers)
