"""The gateway's ASGI app: OpenAI-compatible routes in front of one broker connection.

Connects: one AsyncClient (a DEALER) to the broker frontend, shared by every HTTP request of
this process; replies are matched to waiting requests by request id. Serves:
  POST /v1/completions, /v1/chat/completions (JSON or SSE), /v1/embeddings
  GET  /v1/models, /health, /ready, /metrics, /openapi.json, /docs
A client that disconnects has its request cancelled in the worker within one step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from zeroserve.gateway import responses
from zeroserve.gateway.auth import ApiKey, KeyStore
from zeroserve.gateway.cache import ResponseCache, cache_key
from zeroserve.gateway.errors import ApiError, from_zeroserve
from zeroserve.gateway.metrics import Metrics
from zeroserve.gateway.middleware import Frontline
from zeroserve.gateway.ratelimit import Limits, RateLimiter
from zeroserve.gateway.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

from zeroserve import errors
from zeroserve.client import AsyncClient, AsyncRequestHandle, Chunk
from zeroserve.config import GatewayConfig
from zeroserve.keys import PeerKeys

log = logging.getLogger("zeroserve.gateway")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Gateway:
    """What the routes of one gateway process share: broker client, keys, limits, cache."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.keys = KeyStore.load(cfg.api_keys_file or None)
        self.limiter = RateLimiter()
        self.cache = ResponseCache(cfg.cache_bytes, cfg.cache_ttl_s)
        self.metrics = Metrics()
        self.client: AsyncClient | None = None
        self.table: dict[str, Any] = {"workers": []}
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        keys = PeerKeys.load(self.cfg.keys_dir, self.cfg.key_name) if self.cfg.keys_dir else None
        self.client = AsyncClient(self.cfg.broker, timeout_s=self.cfg.request_timeout_s,
                                  keys=keys, insecure=self.cfg.insecure)
        self._poller = asyncio.get_running_loop().create_task(self._poll_table())
        if not self.keys.enabled:
            log.warning("no API keys configured: authentication is OFF")
        log.info("gateway up: broker=%s keys=%d cache=%dMiB", self.cfg.broker,
                 len(self.keys.keys), self.cfg.cache_bytes >> 20)

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self.client is not None:
            await self.client.close()

    async def _poll_table(self) -> None:
        """Keep the broker's worker table fresh: /ready, /v1/models and gauges read it."""
        while True:
            try:
                self.table = await self.client.admin("workers", timeout_s=2.0)  # type: ignore
                self.metrics.update_from_table(self.table)
            except errors.ZeroserveError:
                self.table = {"workers": []}
                self.metrics.update_from_table(self.table)
            await asyncio.sleep(self.cfg.table_poll_s)

    # -- per request ---------------------------------------------------------------------

    def authenticate(self, request: Request) -> ApiKey | None:
        """The caller's key (None when no keys are configured); 401 without a valid one."""
        if not self.keys.enabled:
            return None
        key = self.keys.check(request.headers.get("authorization"))
        if key is None:
            raise ApiError(401, "missing or invalid API key", "invalid_request_error",
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        request.state.key_id = key.id
        return key

    def authorize(self, request: Request, model: str) -> ApiKey | None:
        key = self.authenticate(request)
        if key is not None and not key.may_use(model):
            raise ApiError(403, f"this key may not use model {model!r}",
                           "permission_error", "model_not_allowed")
        return key

    def admit(self, key: ApiKey | None, tokens: int) -> tuple[str, dict[str, str]]:
        key_id = key.id if key else "anonymous"
        limits = Limits(
            rps=key.rps if key and key.rps is not None else self.cfg.rate_rps,
            tpm=key.tpm if key and key.tpm is not None else self.cfg.rate_tpm,
        )
        wait, headers = self.limiter.admit(key_id, limits, tokens)
        if wait:
            retry = "60" if wait == float("inf") else str(max(1, int(wait + 0.999)))
            raise ApiError(429, "rate limit exceeded", "rate_limit_exceeded",
                           "rate_limit_exceeded", headers={**headers, "Retry-After": retry})
        return key_id, headers

    def request_id(self, request: Request) -> str:
        rid = request.state.request_id
        if self.client is not None and rid in self.client.core.pending:
            rid = f"{rid}-{uuid.uuid4().hex[:6]}"  # the same X-Request-Id twice in flight
        return rid


def create_app(cfg: GatewayConfig) -> Any:
    gw = Gateway(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    docs = {} if not gw.keys.enabled else {  # with keys, nothing is served without one
        "docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="zeroserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway of zeroserve", **docs)
    app.state.gateway = gw

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        text = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            text = "unknown field (this server refuses fields it would not honour)"
        msg = f"{loc}: {text}" if loc else text
        return JSONResponse(ApiError(400, msg, param=loc, code="invalid_value").body(), 400)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        n = len(gw.table.get("workers", []))
        return JSONResponse({"status": "ready" if n else "not ready", "workers": n},
                            200 if n else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        gw.authenticate(request)
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        key = gw.authenticate(request)
        names = sorted({m for w in gw.table.get("workers", []) for m in w["models"]
                        if key is None or key.may_use(m)})
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "zeroserve"} for m in names]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await _generate(gw, request, req, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await _generate(gw, request, req, "/v1/chat/completions", chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
        key = gw.authorize(request, req.model)
        texts = req.texts()
        key_id, rl_headers = gw.admit(key, sum(len(t) for t in texts) // 4 + 1)
        request.state.model = req.model
        assert gw.client is not None
        try:
            handle = await gw.client.submit(req.model, request_id=gw.request_id(request),
                                            tenant=key_id, input=texts,
                                            **gw.client.tensors.domain)
            result = await _unless_disconnected(request, handle, handle.result())
            emb = gw.client.tensors.outputs(result, copy=True)["embeddings"]
        except errors.ZeroserveError as exc:
            raise from_zeroserve(exc) from None
        usage = result.data.get("usage", {})
        request.state.prompt_tokens = usage.get("prompt_tokens", 0)
        data = []
        for i, row in enumerate(emb):
            vec: Any = (base64.b64encode(row.numpy().tobytes()).decode()
                        if req.encoding_format == "base64" else row.tolist())
            data.append({"object": "embedding", "index": i, "embedding": vec})
        tokens = usage.get("prompt_tokens", 0)
        return JSONResponse({"object": "list", "data": data, "model": req.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                            headers=rl_headers)

    routes = {getattr(r, "path", "") for r in app.routes}

    def count(path: str, status: int) -> None:  # a label per route, not per path asked for
        gw.metrics.requests.labels(path if path in routes else "other", str(status)).inc()

    def key_ok(authorization: bytes | None) -> bool:
        return not gw.keys.enabled or gw.keys.check(
            authorization.decode("latin-1") if authorization else None) is not None

    return Frontline(app, cfg.max_body_bytes, count, key_ok)


async def _unless_disconnected(request: Request, handle: AsyncRequestHandle, work: Any) -> Any:
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


async def _generate(gw: Gateway, request: Request, req: Any, route: str, chat: bool) -> Response:
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
            first = await _unless_disconnected(request, handle, chunks.__anext__())
        except errors.ZeroserveError as exc:
            gw.limiter.refund(key_id, reserved)
            raise from_zeroserve(exc) from None
        stream = _sse(gw, request, first, chunks, t0, meta, chat, req.include_usage, key_id,
                      reserved)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **rl_headers})
    try:
        text, data, lps = await _unless_disconnected(
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
