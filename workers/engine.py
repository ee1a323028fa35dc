"""The small interface between the worker runtime and an engine (echo, LLM, tensor).

The runtime owns sockets and threads; an engine owns compute. The runtime calls, from one
thread only: ``add`` for each new request, ``cancel`` when a client gives up, then ``step``
while ``has_work`` is true. Each step returns the outputs it produced: a delta to stream, a
final result, or an error, per request.

An engine may also define ``prepare(body) -> object``: the request's text work (templating,
tokenization, validation), which touches no engine state. The runtime then calls it on a
thread of its own and hands its result to ``add`` in place of the body, so text work never
runs inside a step. engines.py builds the one a worker's config names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

RequestKey = tuple[bytes, str]  # (route: the client identity, request id)


class EngineError(Exception):
    """A request the engine cannot serve; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class FatalEngineError(Exception):
    """The engine cannot go on: the worker sends a dead notice and exits non-zero."""


class UnsupportedModel(ValueError):
    """A model this engine cannot serve exactly: refused at load, the message says why."""


@dataclass(slots=True)
class Output:
    """What one step produced for one request.

    `delta` is streamed as a CHUNK; with `finish` set the request is done and its END carries
    `finish` (finish_reason, usage) merged with the last delta; with `error` set it fails.
    """

    key: RequestKey
    delta: dict[str, Any] | None = None
    finish: dict[str, Any] | None = None
    error: tuple[str, str] | None = None
    buffers: list[Any] = field(default_factory=list)


class Engine(Protocol):
    models: tuple[str, ...]
    capacity: int
    device: str

    def add(self, key: RequestKey, body: dict[str, Any], buffers: list[bytes]) -> None: ...

    def cancel(self, key: RequestKey) -> list[Output]: ...

    def abort_all(self, code: str, message: str) -> list[Output]: ...

    def step(self) -> list[Output]: ...

    def has_work(self) -> bool: ...

    def warmup(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
