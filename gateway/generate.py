"""The text-generation routes' work: one request through the broker, as JSON or as SSE.

`generate` serves /v1/completions and /v1/chat/completions for app.py: authorize, rate-limit,
answer from the response cache when it may, submit to the broker through the gateway's one
AsyncClient, then collect the whole reply or stream it as OpenAI's server-sent events; the
tokens reserved for the rate limit are settled whatever way the request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from zeroserve.gateway import responses
from zeroserve.gateway.cache import cache_key
from zeroserve.gateway.errors import ApiError, from_zeroserve

from zeroserve import errors
from zeroserve.client import AsyncRequestHandle, Chunk

if TYPE_CHECKING:
    from zeroserve.gateway.app import Gateway

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def unless_disconnected(request: Request, handle: AsyncRequestHandle, work: Any) -> Any:
    """Await `work` unless the HTTP client goes away first; then cancel the request."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        handle.client.cancel_nowait(handle.id)
        raise errors.CancelledError("client disconnected", handle.id)
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def generate(gw: Gateway, request: Request, req: Any, route: str, chat: bool) -> Response:
    key = gw.authorize(request, req.model)
    try:
        body = req.engine_body(gw.cfg.max_tokens_default) if not chat else req.engine_body()
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from None
    reserved = req.prompt_chars() // 4 + body["max_tokens"]
    request.state.prompt_estimate = req.prompt_chars() // 4
    key_id, rl_headers = gw.admit(key, reserved)
    state = request.state
    state.model = req.model
    ckey = None
    if not req.stream and gw.cache.enabled and _cache_allowed(request):
        ckey = cache_key(route, req.model_dump(exclude_none=True), key_id)
        if ckey is not None:
            hit = gw.cache.get(ckey)
            gw.metrics.cache.labels("hit" if hit else "miss").inc()
            state.cache = "hit" if hit else "miss"
            rl_headers["x-zeroserve-cache"] = state.cache
            if hit:
                gw.limiter.refund(key_id, reserved)
                return Response(hit, media_type="application/json", headers=rl_headers)
    assert gw.client is not None
    if not gw.client.core.broker_alive:
        gw.limiter.refund(key_id, reserved)
        raise from_zeroserve(errors.UnavailableError("the broker is not answering"))
    rid = gw.request_id(request)
    try:
        handle = await gw.client.submit(req.model, request_id=rid, tenant=key_id, **body)
    except errors.ZeroserveError as exc:
        gw.limiter.refund(key_id, reserved)
        raise from_zeroserve(exc) from None
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "created": int(time.time()),
            "model": req.model}
    t0 = time.perf_counter()
    if req.stream:
        # Wait for the first reply before sending headers, so a rejected request gets a real
        # HTTP error instead of an error event inside a 200 stream.
        chunks = handle.chunks().__aiter__()
        try:
            first = await unless_disconnected(request, handle, chunks.__anext__())
        except errors.ZeroserveError as exc:
            gw.limiter.refund(key_id, reserved)
            raise from_zeroserve(exc) from None
        stream = _sse(gw, request, first, chunks, t0, meta, chat, req.include_usage, key_id,
                      reserved)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **rl_headers})
    try:
        text, data, lps = await unless_disconnected(
            request, handle, _collect(gw, handle, t0, state))
    except errors.ZeroserveError as exc:
        raise from_zeroserve(exc) from None
    finally:
        gw.limiter.refund(key_id, reserved - _used(state))
    gw.metrics.e2e.observe(time.perf_counter() - t0)
    raw = responses.completion_body(meta, chat, text, data, lps if "logprobs" in body else None)
    if ckey is not None:
        gw.cache.put(ckey, raw)
    return Response(raw, media_type="application/json", headers=rl_headers)


def _cache_allowed(request: Request) -> bool:
    cc = request.headers.get("cache-control", "")
    return "no-cache" not in cc and "no-store" not in cc and (
        request.headers.get("x-zeroserve-cache", "").lower() != "off")


def _used(state: Any) -> int:
    """Tokens to charge: the worker's usage; for a request that streamed tokens and ended
    without its END (its client left), the prompt estimate and every token streamed."""
    streamed = getattr(state, "streamed_tokens", 0)
    if not hasattr(state, "prompt_tokens") and streamed:
        state.prompt_tokens = getattr(state, "prompt_estimate", 0)
        state.completion_tokens = streamed
        state.cut_short = True
    return getattr(state, "prompt_tokens", 0) + getattr(state, "completion_tokens", 0)


def _observe(gw: Gateway, chunk: Chunk, t0: float, last: float, state: Any) -> float:
    """Record TTFT / ITL for a chunk that carries tokens; returns the new 'last' time."""
    now = time.perf_counter()
    if chunk.token_ids:
        state.streamed_tokens = getattr(state, "streamed_tokens", 0) + len(chunk.token_ids)
        if not hasattr(state, "ttft_ms"):
            state.ttft_ms = round((now - t0) * 1000, 2)
            gw.metrics.ttft.observe(now - t0)
        else:
            gw.metrics.itl.observe(now - last)
        return now
    return last


def _record_usage(gw: Gateway, state: Any, data: dict[str, Any]) -> None:
    usage = data.get("usage") or {}
    state.prompt_tokens = usage.get("prompt_tokens", 0)
    state.completion_tokens = usage.get("completion_tokens", 0)
    gw.metrics.tokens.labels("prompt").inc(state.prompt_tokens)
    gw.metrics.tokens.labels("completion").inc(state.completion_tokens)
    if "queue_ms" in data:
        gw.metrics.queue.observe(data["queue_ms"] / 1000)


async def _collect(gw: Gateway, handle: AsyncRequestHandle, t0: float, state: Any
                   ) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Text, END fields and logprobs of a whole request, recording its timings."""
    parts: list[str] = []
    lps: list[dict[str, Any]] = []
    last = t0
    async for chunk in handle.chunks():
        last = _observe(gw, chunk, t0, last, state)
        parts.append(chunk.text)
        lps.extend(chunk.data.get("logprobs") or ())
        if chunk.final:
            _record_usage(gw, state, chunk.data)
            return "".join(parts), chunk.data, lps
    return "".join(parts), {}, lps


async def _chain(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    if not first.final:
        async for chunk in rest:
            yield chunk


async def _sse(gw: Gateway, request: Request, first: Chunk, rest: AsyncIterator[Chunk],
               t0: float, meta: dict[str, Any], chat: bool, include_usage: bool, key_id: str,
               reserved: int) -> AsyncIterator[bytes]:
    """OpenAI's SSE: role first (chat), content deltas, finish_reason, usage, [DONE]."""
    events = responses.SseEvents(meta, chat)
    state = request.state
    last = t0
    try:
        if chat:
            yield events.role()
        async for chunk in _chain(first, rest):
            last = _observe(gw, chunk, t0, last, state)
            lps = chunk.data.get("logprobs")
            if chunk.text or lps:
                yield events.content(chunk.text, None, lps)
            if chunk.final:
                _record_usage(gw, state, chunk.data)
                yield events.content("", chunk.data.get("finish_reason"))
                if include_usage:
                    yield events.usage(chunk.data)
        gw.metrics.e2e.observe(time.perf_counter() - t0)
    except errors.ZeroserveError as exc:  # the stream has started: report in-band
        yield events.error(from_zeroserve(exc).body())
    finally:
        gw.limiter.refund(key_id, reserved - _used(state))
        with contextlib.suppress(Exception):
            await rest.aclose()  # type: ignore[attr-defined]  # cancels if unfinished
    yield events.DONE
