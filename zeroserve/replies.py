"""What a caller gets back: chunks and results, and the per-request collector that holds them.

A `Collector` per request buffers its replies until the caller reads them: consecutive plain
chunks merge while the reader lags (text concatenates, token lists extend), so a slow consumer
never grows an unbounded per-token queue (vLLM's per-request output collectors). The sync
client waits on a `ThreadCollector`, the async one on an `AsyncCollector`. No sockets here.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from zeroserve import errors


class PayloadView:
    """Read access to the usual fields of a reply payload (`data`)."""

    __slots__ = ()
    data: dict[str, Any]

    @property
    def text(self) -> str:
        return self.data.get("text", "")

    @property
    def token_ids(self) -> list[int]:
        return self.data.get("token_ids", [])


@dataclass(slots=True)
class Chunk(PayloadView):
    """One streamed part: a delta payload (e.g. text, token_ids) and any raw buffers."""

    data: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)
    final: bool = False


@dataclass(slots=True)
class Result(PayloadView):
    """A finished request: merged deltas plus the END fields (finish_reason, usage, ...)."""

    request_id: str
    data: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)
    # every choice's result, this one first, when it was asked for with n > 1
    choices: list[Result] = field(default_factory=list, repr=False, compare=False)

    @property
    def finish_reason(self) -> str | None:
        return self.data.get("finish_reason")

    @property
    def usage(self) -> dict[str, int]:
        return self.data.get("usage", {})


def merge_delta(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """Fold a delta into an accumulated payload: strings concatenate, lists extend."""
    for k, v in delta.items():
        old = into.get(k)
        if isinstance(old, str) and isinstance(v, str):
            into[k] = old + v
        elif isinstance(old, list) and isinstance(v, list):
            old.extend(v)
        else:
            into[k] = list(v) if isinstance(v, list) else v


class Collector:
    """Per-request reply buffer. Consecutive plain chunks merge while nobody reads them."""

    def __init__(self) -> None:
        self.items: collections.deque[Chunk | errors.ZeroserveError] = collections.deque()
        self.done = False

    def put(self, item: Chunk | errors.ZeroserveError) -> None:
        last = self.items[-1] if self.items else None
        if (isinstance(item, Chunk) and isinstance(last, Chunk) and not last.final
                and not last.buffers and not item.buffers):
            merge_delta(last.data, item.data)
            last.final = item.final
        else:
            self.items.append(item)
        if not isinstance(item, Chunk) or item.final:
            self.done = True
        self.notify()

    def notify(self) -> None:
        pass


class ThreadCollector(Collector):
    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()

    def put(self, item: Chunk | errors.ZeroserveError) -> None:
        with self.cond:
            super().put(item)

    def notify(self) -> None:
        self.cond.notify()

    def get(self, timeout: float | None) -> Chunk | errors.ZeroserveError | None:
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            return self.items.popleft() if self.items else None


class AsyncCollector(Collector):
    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def notify(self) -> None:
        self.event.set()

    async def get(self, timeout: float | None) -> Chunk | errors.ZeroserveError | None:
        if not self.items:
            self.event.clear()
            try:  # not wait_for: on 3.11 it can swallow a cancel that races the event
                async with asyncio.timeout(timeout):
                    await self.event.wait()
            except TimeoutError:
                return None
        return self.items.popleft() if self.items else None


def merge_result(rid: str, parts: list[Chunk]) -> Result:
    data: dict[str, Any] = {}
    buffers: list[bytes] = []
    for part in parts:
        merge_delta(data, part.data)
        buffers.extend(part.buffers)
    return Result(rid, data, buffers)


def first_of(choices: list[Result]) -> Result:
    """The first choice, holding them all (when there are several) in `choices`."""
    if len(choices) > 1:
        choices[0].choices = choices
    return choices[0]


def deadline_of(timeout_s: float | None, default_s: float | None) -> float | None:
    t = timeout_s if timeout_s is not None else default_s
    return None if t is None else time.monotonic() + t


def time_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def settle(item: Chunk | errors.ZeroserveError | None, rid: str) -> Chunk:
    """A reply item as a chunk; raise its error, or a timeout when nothing came (None)."""
    if item is None:
        raise errors.RequestTimeoutError("no reply in time", rid)
    if isinstance(item, errors.ZeroserveError):
        raise item
    return item
