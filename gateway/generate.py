"""The text-generation routes' work: one request through the broker, as JSON or as SSE.

`generate` serves /v1/completions and /v1/chat/completions for app.py: authorize, rate-limit,
answer from the response cache when it may, submit to the broker through the gateway's one
AsyncClient, then collect the whole reply or stream it as OpenAI's server-sent events; the
request's ticket (ticket.py) settles its rate-limit reservation however it ends.

`n` > 1 sends n requests (request ids `<id>`, `<id>-c1`, ...; with a seed, choice i is
seeded seed + i, so a seed reproduces every choice). They share the prompt's KV through the
worker's prefix cache when they land on one worker; streamed, their deltas interleave, each
tagged with its choice index.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from zeroserve import contract, errors
from zeroserve.client import AsyncRequestHandle, Chunk
from zeroserve.gateway import openai_shapes
from zeroserve.gateway.api_errors import ApiError, from_zeroserve
from zeroserve.gateway.cache import cache_key
from zeroserve.gateway.metrics import priority_label
from zeroserve.gateway.ticket import Ticket, ticket
from zeroserve.gateway.tools import ToolStream

if TYPE_CHECKING:
    from zeroserve.gateway.gateway import Gateway

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def unless_disconnected(request: Request, handles: AsyncRequestHandle | list, work: Any
                              ) -> Any:
    """Await `work` unless the HTTP client goes away first; then cancel the request(s)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):  # collect it: no "never retrieved" noise
            await task
        handles = handles if isinstance(handles, list) else [handles]
        for handle in handles:
            handle.client.cancel_nowait(handle.id)
        raise errors.CancelledError("client disconnected", handles[0].id)
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Started:
    """A generation submitted to the broker: what finishing it (JSON or SSE) needs."""

    handles: list[AsyncRequestHandle]
    meta: dict[str, Any]  # id, created, model
    t0: float
    headers: dict[str, str]  # rate-limit (and cache) headers for the response
    body: dict[str, Any]  # the engine body every choice shares (without its prompt)
    ticket: Ticket
    n: int  # choices per prompt: handle i is choice i % n of prompt i // n
    cache_at: str | None = None  # the response cache's key for the reply, when it may be kept


def _deadline(request: Request, body: dict[str, Any], key: Any) -> None:
    """The request's timeout: its body's, else its x-request-timeout header, else its key's."""
    if body.get("timeout") is not None:
        return
    header = request.headers.get("x-request-timeout")
    if header is not None:
        try:
            value = float(header)
            contract.NUMBERS["timeout"].check("x-request-timeout", value)
        except ValueError as exc:
            raise ApiError(400, str(exc) if "must be" in str(exc) else
                           "x-request-timeout must be a number of seconds") from None
        body["timeout"] = value
    elif key is not None and key.timeout is not None:
        body["timeout"] = key.timeout


async def start(gw: Gateway, request: Request, req: Any, route: str, chat: bool,
                cacheable: bool = True) -> Started | Response:
    """Authorize, rate-limit, answer from the response cache when it may (a Response), else
    submit the request's choices to the broker. The reservation is the ticket's: it is
    settled however the request ends."""
    t = ticket(request)
    key = gw.authorize(request, req.model)
    gw.check_engine(req.model, route)
    try:
        body = req.engine_body()  # max_tokens named or the contract's default for its route
        inputs = req.inputs()  # each prompt's fields: a batch of completions prompts, or {}
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from None
    _deadline(request, body, key)
    if key is not None:
        asked = body.get("priority") if "priority" in req.model_fields_set else None
        if (priority := key.priority_of(asked)) is not None:
            body["priority"] = priority
    t.priority = body.get("priority", 0)
    n = getattr(req, "n", 1)
    t.model, t.prompt_estimate = req.model, req.prompt_chars() // 4
    headers = gw.admit(request, key, t.prompt_estimate + body["max_tokens"] * n * len(inputs))
    cache_at = None
    if cacheable and not req.stream and gw.cache.enabled and _cache_allowed(request):
        cache_at = cache_key(route, req.model_dump(exclude_none=True), t.key_id or "")
        if cache_at is not None:
            hit = gw.cache.get(cache_at)
            gw.metrics.cache.labels("hit" if hit else "miss").inc()
            t.cache = headers["x-zeroserve-cache"] = "hit" if hit else "miss"
            if hit:
                return Response(hit, media_type="application/json", headers=headers)
    assert gw.client is not None
    if not gw.client.broker_alive:
        raise from_zeroserve(errors.UnavailableError("the broker is not answering"))
    rid, wire = t.request_id, gw.wire_id(request)
    handles: list[AsyncRequestHandle] = []
    try:
        bodies = [b for fields in inputs for b in contract.choices({**body, **fields}, n)]
        for i, choice_body in enumerate(bodies):
            handles.append(await gw.client.submit(req.model, request_id=wire if not i else
                                                  f"{wire}-c{i}", tenant=t.key_id,
                                                  trace=t.trace, **choice_body))
    except errors.ZeroserveError as exc:
        for handle in handles:
            gw.client.cancel_nowait(handle.id)
        raise from_zeroserve(exc) from None
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "created": int(time.time()),
            "model": req.model}
    return Started(handles, meta, time.perf_counter(), headers, body, t, n, cache_at)


async def first_chunk(gw: Gateway, request: Request,
                      started: Started) -> tuple[Chunk, AsyncIterator[Chunk]]:
    """Wait for choice 0's first reply before any header goes out, so that a refused request
    gets a real HTTP error rather than an error event inside a 200 stream."""
    chunks = started.handles[0].chunks().__aiter__()
    try:
        first = await unless_disconnected(request, started.handles, chunks.__anext__())
    except errors.ZeroserveError as exc:
        for handle in started.handles[1:]:
            handle.client.cancel_nowait(handle.id)
        raise refused(gw, started.ticket, exc) from None
    return first, chunks


async def generate(gw: Gateway, request: Request, req: Any, route: str, chat: bool) -> Response:
    started = await start(gw, request, req, route, chat)
    if isinstance(started, Response):
        return started
    if req.stream:
        return await _stream(gw, request, req, started, chat)
    return await _complete(gw, request, req, started, chat)


async def _complete(gw: Gateway, request: Request, req: Any, started: Started,
                    chat: bool) -> Response:
    """The whole reply as one JSON body (cached when the request may be)."""
    t = started.ticket
    try:
        choices = await unless_disconnected(request, started.handles, asyncio.gather(
            *(collect(gw, handle, started.t0, t, not i % started.n)
              for i, handle in enumerate(started.handles))))
    except errors.ZeroserveError as exc:
        raise refused(gw, t, exc) from None
    gw.metrics.e2e.labels(req.model).observe(time.perf_counter() - started.t0)
    raw = openai_shapes.completion_body(started.meta, chat, choices, "logprobs" in started.body,
                                        started.n, req.tool_mode() if chat else None)
    if started.cache_at is not None:
        gw.cache.put(started.cache_at, raw)
    return Response(raw, media_type="application/json", headers=started.headers)


async def _stream(gw: Gateway, request: Request, req: Any, started: Started,
                  chat: bool) -> Response:
    """OpenAI's server-sent events, once the first reply came."""
    first, chunks = await first_chunk(gw, request, started)
    n, meta = len(started.handles), started.meta
    parts = (_indexed(first, chunks) if n == 1 else
             _merged([chain(first, chunks), *(h.chunks() for h in started.handles[1:])]))
    calls = [ToolStream(mode == "forced", f"{meta['id']}_{i}") for i in range(n)] if (
        chat and (mode := req.tool_mode())) else None
    stream = _sse(gw, started, parts, chat, req.include_usage, calls)
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={**SSE_HEADERS, **started.headers})


def _cache_allowed(request: Request) -> bool:
    cc = request.headers.get("cache-control", "")
    return "no-cache" not in cc and "no-store" not in cc and (
        request.headers.get("x-zeroserve-cache", "").lower() != "off")


def observe(gw: Gateway, chunk: Chunk, t0: float, last: float, t: Ticket) -> float:
    """Record TTFT / ITL for a chunk that carries tokens; returns the new 'last' time."""
    now = time.perf_counter()
    if chunk.token_ids:
        t.streamed_tokens += len(chunk.token_ids)
        if t.ttft_ms is None:
            t.ttft_ms = round((now - t0) * 1000, 2)
            gw.metrics.ttft.labels(t.model).observe(now - t0)
        else:
            gw.metrics.itl.labels(t.model).observe(now - last)
        return now
    return last


def record_usage(gw: Gateway, t: Ticket, data: dict[str, Any], first: bool) -> None:
    """One choice's END: its prompt counts once (on its `first` choice), completions add up."""
    usage = data.get("usage") or {}
    if first:
        t.prompt_tokens = (t.prompt_tokens or 0) + usage.get("prompt_tokens", 0)
        gw.metrics.tokens.labels("prompt").inc(usage.get("prompt_tokens", 0))
    t.completion_tokens += usage.get("completion_tokens", 0)
    gw.metrics.tokens.labels("completion").inc(usage.get("completion_tokens", 0))
    prio = priority_label(t.priority)
    if "queue_ms" in data:
        gw.metrics.queue.labels(t.model, prio).observe(data["queue_ms"] / 1000)
    if data.get("finish_reason") == "timeout":
        gw.metrics.late.labels(t.model, prio, "running").inc()


def refused(gw: Gateway, t: Ticket, exc: errors.ZeroserveError) -> ApiError:
    """A request's error as the HTTP error it answers with (a queued request past its deadline
    counted as a deadline miss)."""
    if isinstance(exc, errors.RequestTimeoutError):  # a label per served model, no other
        served = {m for w in gw.table.get("workers", []) for m in w.get("models", [])}
        model = t.model if t.model in served else "other"
        gw.metrics.late.labels(model, priority_label(t.priority), "queued").inc()
    return from_zeroserve(exc)


async def collect(gw: Gateway, handle: AsyncRequestHandle, t0: float, t: Ticket,
                  first: bool = True) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Text, END fields and logprobs of a whole request, recording its timings (and its
    prompt's usage when it is the `first` choice of its prompt)."""
    parts: list[str] = []
    lps: list[dict[str, Any]] = []
    last = t0
    async for chunk in handle.chunks():
        last = observe(gw, chunk, t0, last, t)
        parts.append(chunk.text)
        lps.extend(chunk.data.get("logprobs") or ())
        if chunk.final:
            record_usage(gw, t, chunk.data, first)
            return "".join(parts), chunk.data, lps
    return "".join(parts), {}, lps


async def chain(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """`first`, then the rest; closing it closes the rest (which cancels its request)."""
    try:
        yield first
        if not first.final:
            async for chunk in rest:
                yield chunk
    finally:
        with contextlib.suppress(Exception):
            await rest.aclose()  # type: ignore[attr-defined]


async def _indexed(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[tuple[int, Chunk]]:
    """One choice's chunks as (0, chunk); closing it cancels the request."""
    chained = chain(first, rest)
    try:
        async for chunk in chained:
            yield 0, chunk
    finally:
        await chained.aclose()


async def _merged(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """Several choices' chunks as (index, chunk), in arrival order; an error in any ends it,
    and closing it cancels every choice still running."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk))
        except errors.ZeroserveError as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, errors.ZeroserveError):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def _sse(gw: Gateway, started: Started, parts: AsyncIterator[tuple[int, Chunk]],
               chat: bool, include_usage: bool, calls: list[ToolStream] | None = None
               ) -> AsyncIterator[bytes]:
    """OpenAI's SSE: role first (chat), each choice's events, usage of them all, [DONE]."""
    events = openai_shapes.SseEvents(started.meta, chat)
    t, t0, last = started.ticket, started.t0, started.t0
    finals: dict[int, dict[str, Any]] = {}  # each choice's END fields
    try:
        if chat:
            for i in range(len(started.handles)):
                yield events.role(i)
        async for i, chunk in parts:
            last = observe(gw, chunk, t0, last, t)
            for event in _chunk_events(events, i, chunk, calls[i] if calls else None):
                yield event
            if chunk.final:
                record_usage(gw, t, chunk.data, not i % started.n)
                finals[i] = chunk.data
        if include_usage:
            yield events.usage([finals[i] for i in sorted(finals)], started.n)
        gw.metrics.e2e.labels(t.model).observe(time.perf_counter() - t0)
    except errors.ZeroserveError as exc:  # the stream has started: report in-band
        yield events.error(from_zeroserve(exc).body())
    finally:
        with contextlib.suppress(Exception):
            await parts.aclose()  # type: ignore[attr-defined]  # cancels if unfinished
    yield events.DONE


def _chunk_events(events: openai_shapes.SseEvents, i: int, chunk: Chunk,
                  calls: ToolStream | None) -> list[bytes]:
    """The events of choice i's chunk: its text (through the choice's ToolStream when tools
    are in play, which may turn it into tool-call deltas), logprobs, and its finish_reason."""
    out: list[bytes] = []
    lps = chunk.data.get("logprobs")
    fin = chunk.data.get("finish_reason") if chunk.final else None
    if calls is not None:
        out.extend(events.delta(delta, i) for delta in calls.feed(chunk.text))
        if chunk.final:
            rest, fin = calls.finish(fin)
            out.extend(events.delta(delta, i) for delta in rest)
        if lps:
            out.append(events.content("", None, lps, i))
    elif chunk.text or lps:
        out.append(events.content(chunk.text, None, lps, i))
    if chunk.final:
        out.append(events.content("", fin, None, i))
    return out
