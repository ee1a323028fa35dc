"""The text-generation routes' work: one request through the broker, as JSON or as SSE.

`generate` serves /v1/completions and /v1/chat/completions for app.py: authorize, rate-limit,
answer from the response cache when it may, submit to the broker through the gateway's one
AsyncClient, then collect the whole reply or stream it as OpenAI's server-sent events; the
tokens reserved for the rate limit are settled whatever way the request ends.

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

from zeroserve import errors
from zeroserve.client import AsyncRequestHandle, Chunk
from zeroserve.gateway import responses
from zeroserve.gateway.cache import cache_key
from zeroserve.gateway.errors import ApiError, from_zeroserve
from zeroserve.gateway.tools import ToolStream

if TYPE_CHECKING:
    from zeroserve.gateway.app import Gateway

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
    key_id: str
    reserved: int  # tokens reserved for the rate limit, settled when it ends
    headers: dict[str, str]  # rate-limit (and cache) headers for the response
    body: dict[str, Any]  # the engine body of choice 0


async def start(gw: Gateway, request: Request, req: Any, route: str, chat: bool,
                cacheable: bool = True) -> Started | Response:
    """Authorize, rate-limit, answer from the response cache when it may (a Response), else
    submit the request's choices to the broker."""
    key = gw.authorize(request, req.model)
    try:
        body = req.engine_body(gw.cfg.max_tokens_default) if not chat else req.engine_body()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from None
    n = getattr(req, "n", 1)
    reserved = req.prompt_chars() // 4 + body["max_tokens"] * n
    request.state.prompt_estimate = req.prompt_chars() // 4
    key_id, rl_headers = gw.admit(key, reserved)
    state = request.state
    state.model = req.model
    if cacheable and not req.stream and gw.cache.enabled and _cache_allowed(request):
        state.cache_key = cache_key(route, req.model_dump(exclude_none=True), key_id)
        if state.cache_key is not None:
            hit = gw.cache.get(state.cache_key)
            gw.metrics.cache.labels("hit" if hit else "miss").inc()
            state.cache = "hit" if hit else "miss"
            rl_headers["x-zeroserve-cache"] = state.cache
            if hit:
                gw.limiter.refund(key_id, reserved)
                return Response(hit, media_type="application/json", headers=rl_headers)
    assert gw.client is not None
    if not gw.client.broker_alive:
        gw.limiter.refund(key_id, reserved)
        raise from_zeroserve(errors.UnavailableError("the broker is not answering"))
    rid = gw.request_id(request)
    handles: list[AsyncRequestHandle] = []
    try:
        for i, choice_body in enumerate(_choices(body, n)):
            handles.append(await gw.client.submit(req.model, request_id=rid if not i else
                                                  f"{rid}-c{i}", tenant=key_id,
                                                  trace=getattr(state, "trace", ""),
                                                  **choice_body))
    except errors.ZeroserveError as exc:
        for handle in handles:
            gw.client.cancel_nowait(handle.id)
        gw.limiter.refund(key_id, reserved)
        raise from_zeroserve(exc) from None
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "created": int(time.time()),
            "model": req.model}
    return Started(handles, meta, time.perf_counter(), key_id, reserved, rl_headers, body)


async def generate(gw: Gateway, request: Request, req: Any, route: str, chat: bool) -> Response:
    started = await start(gw, request, req, route, chat)
    if isinstance(started, Response):
        return started
    handles, meta, t0, n = started.handles, started.meta, started.t0, len(started.handles)
    key_id, reserved, state = started.key_id, started.reserved, request.state
    if req.stream:
        # Wait for the first reply before sending headers, so a rejected request gets a real
        # HTTP error instead of an error event inside a 200 stream.
        chunks = handles[0].chunks().__aiter__()
        try:
            first = await unless_disconnected(request, handles, chunks.__anext__())
        except errors.ZeroserveError as exc:
            for handle in handles[1:]:
                gw.client.cancel_nowait(handle.id)  # type: ignore[union-attr]
            gw.limiter.refund(key_id, reserved)
            raise from_zeroserve(exc) from None
        parts = (_indexed(first, chunks) if n == 1 else
                 _merged([chain(first, chunks), *(h.chunks() for h in handles[1:])]))
        calls = [ToolStream(mode == "forced", f"{meta['id']}_{i}") for i in range(n)] if (
            chat and (mode := req.tool_mode())) else None
        stream = _sse(gw, request, parts, n, t0, meta, chat, req.include_usage, key_id,
                      reserved, calls)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **started.headers})
    try:
        choices = await unless_disconnected(request, handles, asyncio.gather(
            *(collect(gw, handle, t0, state) for handle in handles)))
    except errors.ZeroserveError as exc:
        raise from_zeroserve(exc) from None
    finally:
        gw.limiter.refund(key_id, reserved - used(state))
    gw.metrics.e2e.labels(req.model).observe(time.perf_counter() - t0)
    raw = responses.completion_body(meta, chat, choices, "logprobs" in started.body,
                                    req.tool_mode() if chat else None)
    if getattr(state, "cache_key", None) is not None:
        gw.cache.put(state.cache_key, raw)
    return Response(raw, media_type="application/json", headers=started.headers)


def _choices(body: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The engine body of each of n choices: choice i of a seeded request is seeded seed+i."""
    out = [body]
    for i in range(1, n):
        seed = body.get("seed")
        out.append(body if seed is None else
                   {**body, "seed": (seed + i + (1 << 63)) % (1 << 64) - (1 << 63)})
    return out


def _cache_allowed(request: Request) -> bool:
    cc = request.headers.get("cache-control", "")
    return "no-cache" not in cc and "no-store" not in cc and (
        request.headers.get("x-zeroserve-cache", "").lower() != "off")


def used(state: Any) -> int:
    """Tokens to charge: the worker's usage; for a request that streamed tokens and ended
    without its END (its client left), the prompt estimate and every token streamed."""
    streamed = getattr(state, "streamed_tokens", 0)
    if not hasattr(state, "prompt_tokens") and streamed:
        state.prompt_tokens = getattr(state, "prompt_estimate", 0)
        state.completion_tokens = streamed
        state.cut_short = True
    return getattr(state, "prompt_tokens", 0) + getattr(state, "completion_tokens", 0)


def observe(gw: Gateway, chunk: Chunk, t0: float, last: float, state: Any) -> float:
    """Record TTFT / ITL for a chunk that carries tokens; returns the new 'last' time."""
    now = time.perf_counter()
    if chunk.token_ids:
        state.streamed_tokens = getattr(state, "streamed_tokens", 0) + len(chunk.token_ids)
        if not hasattr(state, "ttft_ms"):
            state.ttft_ms = round((now - t0) * 1000, 2)
            gw.metrics.ttft.labels(state.model).observe(now - t0)
        else:
            gw.metrics.itl.labels(state.model).observe(now - last)
        return now
    return last


def record_usage(gw: Gateway, state: Any, data: dict[str, Any]) -> None:
    """One choice's END: the prompt counts once, completions add up."""
    usage = data.get("usage") or {}
    state.prompt_tokens = usage.get("prompt_tokens", 0)
    state.completion_tokens = getattr(state, "completion_tokens", 0) + usage.get(
        "completion_tokens", 0)
    gw.metrics.tokens.labels("prompt").inc(state.prompt_tokens)
    gw.metrics.tokens.labels("completion").inc(usage.get("completion_tokens", 0))
    if "queue_ms" in data:
        gw.metrics.queue.labels(state.model).observe(data["queue_ms"] / 1000)


async def collect(gw: Gateway, handle: AsyncRequestHandle, t0: float, state: Any
                   ) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Text, END fields and logprobs of a whole request, recording its timings."""
    parts: list[str] = []
    lps: list[dict[str, Any]] = []
    last = t0
    async for chunk in handle.chunks():
        last = observe(gw, chunk, t0, last, state)
        parts.append(chunk.text)
        lps.extend(chunk.data.get("logprobs") or ())
        if chunk.final:
            record_usage(gw, state, chunk.data)
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


async def _sse(gw: Gateway, request: Request, parts: AsyncIterator[tuple[int, Chunk]], n: int,
               t0: float, meta: dict[str, Any], chat: bool, include_usage: bool, key_id: str,
               reserved: int, calls: list[ToolStream] | None = None) -> AsyncIterator[bytes]:
    """OpenAI's SSE: role first (chat), content deltas, finish_reason per choice, usage of
    them all, [DONE]. With tools in play (`calls`: one ToolStream a choice) the text goes
    through them and may come out as tool-call deltas."""
    events = responses.SseEvents(meta, chat)
    state = request.state
    last = t0
    finals: list[dict[str, Any]] = []
    try:
        if chat:
            for i in range(n):
                yield events.role(i)
        async for i, chunk in parts:
            last = observe(gw, chunk, t0, last, state)
            lps = chunk.data.get("logprobs")
            fin = chunk.data.get("finish_reason") if chunk.final else None
            if calls is not None:
                for delta in calls[i].feed(chunk.text):
                    yield events.delta(delta, i)
                if chunk.final:
                    rest, fin = calls[i].finish(fin)
                    for delta in rest:
                        yield events.delta(delta, i)
                if lps:
                    yield events.content("", None, lps, i)
            elif chunk.text or lps:
                yield events.content(chunk.text, None, lps, i)
            if chunk.final:
                record_usage(gw, state, chunk.data)
                finals.append(chunk.data)
                yield events.content("", fin, None, i)
        if include_usage:
            yield events.usage(finals)
        gw.metrics.e2e.labels(meta["model"]).observe(time.perf_counter() - t0)
    except errors.ZeroserveError as exc:  # the stream has started: report in-band
        yield events.error(from_zeroserve(exc).body())
    finally:
        gw.limiter.refund(key_id, reserved - used(state))
        with contextlib.suppress(Exception):
            await parts.aclose()  # type: ignore[attr-defined]  # cancels if unfinished
    yield events.DONE
