"""The gateway's ASGI app: OpenAI-compatible routes in front of one broker connection.

Connects: one AsyncClient (a DEALER) to the broker frontend, shared by every HTTP request of
this process; replies are matched to waiting requests by request id. Serves:
  POST /v1/completions, /v1/chat/completions (JSON or SSE: generate.py), /v1/embeddings,
       /tokenize, /detokenize (vLLM's shapes)
  GET  /v1/models, /health, /ready, /metrics, /openapi.json, /docs
A client that disconnects has its request cancelled in the worker within one step.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.cors import CORSMiddleware

from zeroserve import errors
from zeroserve.config import MIB, GatewayConfig
from zeroserve.gateway import responses_api
from zeroserve.gateway.api_errors import ApiError, from_zeroserve
from zeroserve.gateway.auth import ApiKey
from zeroserve.gateway.gateway import Gateway
from zeroserve.gateway.generate import generate, unless_disconnected
from zeroserve.gateway.middleware import Frontline, allowed_hosts
from zeroserve.gateway.ratelimit import BodyPace
from zeroserve.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from zeroserve.gateway.ticket import ticket


def create_app(cfg: GatewayConfig) -> Any:
    """The ASGI app of one gateway process: its routes around one Gateway, wrapped in the
    middleware every request passes (and CORS, if asked for)."""
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
    _error_handlers(app)
    _ops_routes(app, gw)
    _generation_routes(app, gw)
    _text_routes(app, gw)
    return _wrapped(app, gw)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        # a field of several shapes (stop: a string or a list) fails once per shape: report
        # the shape the value has (a too-long list), not "should be a valid string"
        first = next((e for e in errs if not str(e.get("type", "")).endswith("_type")),
                     errs[0] if errs else {})
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error")
            msg = "the request body is not valid JSON" + (f" ({why})" if why else "")
            return JSONResponse(ApiError(400, msg, code="invalid_json").body(), 400)
        loc = ".".join(str(x) for x in first.get("loc", ())
                       if x != "body" and not _shape_tag(x)) or None
        text = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if first.get("type") == "extra_forbidden":
            text = "unknown field (this server refuses fields it would not honour)"
        msg = f"{loc}: {text}" if loc else text
        return JSONResponse(ApiError(400, msg, param=loc, code="invalid_value").body(), 400)


def _shape_tag(part: object) -> bool:
    """pydantic's name for one shape of a field of several (str, list[ContentPart]...) in an
    error's location: not a part of the request."""
    return isinstance(part, str) and ("[" in part or part in (
        "str", "int", "float", "bool", "constrained-str", "constrained-int"))


def _ops_routes(app: FastAPI, gw: Gateway) -> None:
    """GET /health, /ready, /metrics and /v1/models."""
    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        n = len(gw.table.get("workers", []))
        broker = gw.client is not None and gw.client.broker_alive
        ok = bool(n) and broker
        return JSONResponse({"status": "ready" if ok else "not ready", "workers": n,
                             "broker": "answering" if broker else "silent"}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        key = gw.authenticate(request)
        return Response(gw.metrics.exposition(gw.cfg.metrics_vllm_names,
                                              tenant_safe=key is not None and not key.admin),
                        media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        key = gw.authenticate(request)
        names = sorted({m for w in gw.table.get("workers", []) for m in w["models"]
                        if key is None or key.may_use(m)})
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "zeroserve"} for m in names]}


def _generation_routes(app: FastAPI, gw: Gateway) -> None:
    """POST /v1/completions, /v1/chat/completions, /v1/responses (generate.py,
    responses_api.py) and /v1/embeddings."""
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await generate(gw, request, req, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return await generate(gw, request, req, "/v1/chat/completions", chat=True)

    @app.post("/v1/responses")
    async def create_response(req: responses_api.ResponsesRequest,
                              request: Request) -> Response:
        return await responses_api.create(gw, request, req)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request) -> Response:
        key, t = gw.authorize(request, req.model), ticket(request)
        gw.check_engine(req.model, "/v1/embeddings")
        texts = req.texts()
        t.model, t.prompt_estimate = req.model, sum(len(text) for text in texts) // 4 + 1
        rl_headers = gw.admit(request, key, t.prompt_estimate)
        assert gw.client is not None
        try:
            handle = await gw.client.submit(req.model, request_id=gw.wire_id(request),
                                            tenant=t.key_id, input=texts,
                                            **gw.client.tensors.domain)
            result = await unless_disconnected(request, handle, handle.result())
            emb = gw.client.tensors.outputs(result, copy=True)["embeddings"]
        except errors.ZeroserveError as exc:
            raise from_zeroserve(exc) from None
        usage = result.data.get("usage", {})
        t.prompt_tokens = usage.get("prompt_tokens", 0)
        data = []
        for i, row in enumerate(emb):
            vec: Any = (base64.b64encode(row.numpy().tobytes()).decode()
                        if req.encoding_format == "base64" else row.tolist())
            data.append({"object": "embedding", "index": i, "embedding": vec})
        tokens = usage.get("prompt_tokens", 0)
        return JSONResponse({"object": "list", "data": data, "model": req.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                            headers=rl_headers)


def _text_routes(app: FastAPI, gw: Gateway) -> None:
    """POST /tokenize and /detokenize (vLLM's shapes)."""

    async def text_op(request: Request, model: str, body: dict[str, Any],
                      estimate: int) -> dict[str, Any]:
        """/tokenize and /detokenize: charged as prompt tokens, like any request (the
        estimate reserved, then trued up to the worker's count)."""
        key, t = gw.authorize(request, model), ticket(request)
        t.model, t.prompt_estimate = model, estimate
        gw.admit(request, key, estimate)
        assert gw.client is not None
        try:
            handle = await gw.client.submit(model, request_id=gw.wire_id(request),
                                            tenant=t.key_id, resume=False, **body)
            result = await unless_disconnected(request, handle, handle.result())
        except errors.ZeroserveError as exc:
            raise from_zeroserve(exc) from None
        t.prompt_tokens = int((result.data.get("usage") or {}).get("prompt_tokens", estimate))
        return {k: v for k, v in result.data.items() if k not in ("usage", "finish_reason")}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest, request: Request) -> dict[str, Any]:
        try:
            body = req.engine_body()
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return await text_op(request, req.model, body, req.chars() // 4 + 1)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, request: Request) -> dict[str, Any]:
        return await text_op(request, req.model, {"op": "detokenize", "tokens": req.tokens},
                             len(req.tokens))


def _wrapped(app: FastAPI, gw: Gateway) -> Any:
    """The app inside Frontline (keys, Host, body limit and pace, tickets, access log), and
    CORS outermost when origins are configured."""
    cfg = gw.cfg
    routes = {getattr(r, "path", "") for r in app.routes}

    def count(path: str, status: int) -> None:  # a label per route, not per path asked for
        gw.metrics.requests.labels(path if path in routes else "other", str(status)).inc()

    def key_of(authorization: bytes | None) -> ApiKey | None:
        """The caller's key, once per request (the routes take it from the ticket)."""
        return gw.keys.check(authorization.decode("latin-1") if authorization else None)

    hosts = None if gw.keys.enabled else allowed_hosts(cfg.host, cfg.allowed_hosts)
    front = Frontline(app, cfg.max_body_bytes, count, key_of if gw.keys.enabled else None, hosts,
                      BodyPace(cfg.body_mib_per_s * MIB) if cfg.body_mib_per_s > 0 else None)
    if not cfg.cors_origins:
        return front
    # outermost: its headers reach every answer, a 401 or 413 from Frontline included
    origins = [o.strip() for o in cfg.cors_origins.split(",") if o.strip()]
    return CORSMiddleware(front, allow_origins=origins, allow_methods=["GET", "POST"],
                          allow_headers=["*"], expose_headers=["x-request-id"], max_age=600)
