"""A request in flight, as the SDK's callers hold it: iterate its chunks or wait for its result.

`RequestHandle` belongs to the sync `Client`, `AsyncRequestHandle` to `AsyncClient`
(client.py); both read the request's `Collector` (client_core.py) and cancel the request when the
caller stops reading before its end. No sockets here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from zeroserve.replies import (
    AsyncCollector,
    Chunk,
    Result,
    ThreadCollector,
    deadline_of,
    merge_result,
    settle,
    time_left,
)


class RequestHandle:
    """One in-flight request of the sync client: iterate its chunks or wait for its result."""

    def __init__(self, client: Any, rid: str, sink: ThreadCollector) -> None:
        self.client, self.id, self.sink = client, rid, sink

    def chunks(self, timeout_s: float | None = None) -> Iterator[Chunk]:
        deadline = deadline_of(timeout_s, self.client.core.cfg.timeout_s)
        try:
            while True:
                chunk = settle(self.sink.get(time_left(deadline)), self.id)
                yield chunk
                if chunk.final:
                    return
        finally:
            if not self.sink.done:  # broke out, timed out: the worker stops at once
                self.client.cancel(self.id)

    def result(self, timeout_s: float | None = None) -> Result:
        return merge_result(self.id, list(self.chunks(timeout_s)))

    def cancel(self) -> None:
        self.client.cancel(self.id)


class AsyncRequestHandle:
    def __init__(self, client: Any, rid: str, sink: AsyncCollector) -> None:
        self.client, self.id, self.sink = client, rid, sink

    async def chunks(self, timeout_s: float | None = None) -> AsyncIterator[Chunk]:
        deadline = deadline_of(timeout_s, self.client.core.cfg.timeout_s)
        try:
            while True:
                chunk = settle(await self.sink.get(time_left(deadline)), self.id)
                yield chunk
                if chunk.final:
                    return
        finally:
            if not self.sink.done:
                self.client.cancel_nowait(self.id)

    async def result(self, timeout_s: float | None = None) -> Result:
        return merge_result(self.id, [c async for c in self.chunks(timeout_s)])

    async def cancel(self) -> None:
        await self.client.cancel(self.id)
