"""One gateway process's shared state: its broker client, API keys, rate limits, response
cache, metrics and the worker table it last read. app.py builds the routes around one
`Gateway`; generate.py and responses_api.py use it to authorize, admit and submit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import Request

from zeroserve import errors
from zeroserve.client import AsyncClient
from zeroserve.config import GatewayConfig
from zeroserve.gateway.api_errors import ApiError
from zeroserve.gateway.auth import ApiKey, KeyStore
from zeroserve.gateway.cache import ResponseCache
from zeroserve.gateway.metrics import Metrics
from zeroserve.gateway.ratelimit import Limits, RateLimiter
from zeroserve.gateway.ticket import ticket
from zeroserve.keys import PeerKeys

log = logging.getLogger("zeroserve.gateway")

# the engines (WorkerConfig.engine) whose workers answer each kind of route
GENERATES = frozenset({"llm", "echo"})
EMBEDS = frozenset({"embed"})


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
        self.caller_ids: set[tuple[str, str]] = set()  # (key id, X-Request-Id) in flight

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
        key = ticket(request).api_key or self.keys.check(request.headers.get("authorization"))
        if key is None:
            raise ApiError(401, "missing or invalid API key", "invalid_request_error",
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        ticket(request).key_id = key.id
        return key

    def authorize(self, request: Request, model: str) -> ApiKey | None:
        key = self.authenticate(request)
        if key is not None and not key.may_use(model):
            raise ApiError(403, f"this key may not use model {model!r}",
                           "permission_error", "model_not_allowed")
        return key

    def check_engine(self, model: str, route: str) -> None:
        """400 when every worker the table knows for `model` runs an engine that does not
        answer `route` (an embedding model asked to generate, or the reverse), instead of
        the worker refusing fields it has never heard of. A model not in the table passes."""
        answers = EMBEDS if route == "/v1/embeddings" else GENERATES
        engines = {w.get("engine", "") for w in self.table.get("workers", [])
                   if model in w.get("models", ())}
        if engines and not engines & answers:
            hint = ("it makes embeddings: use /v1/embeddings" if engines & EMBEDS else
                    "it generates text: embeddings need an embedding model"
                    if engines & GENERATES else f"it does not answer {route}")
            raise ApiError(400, f"model {model!r} runs the {', '.join(sorted(engines))} "
                                f"engine: {hint}", param="model", code="model_not_supported")

    def admit(self, request: Request, key: ApiKey | None, tokens: int) -> dict[str, str]:
        """Take `tokens` from the key's rate limit into the request's ticket (429 when it has
        not got them); returns the rate-limit headers for the response."""
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
        ticket(request).reserve(self.limiter, key_id, tokens)
        return headers

    def wire_id(self, request: Request) -> str:
        """The id a request travels under: the caller's X-Request-Id (for the logs) made
        unique by this gateway, so no tenant's id can collide with, reveal or steer another's
        (a choice's id adds -c<i>). One key sending an X-Request-Id it has in flight gets 409:
        its two requests' logs would be one."""
        t = ticket(request)
        if t.caller_id:
            claim = (t.key_id or "", t.request_id)
            if claim in self.caller_ids:
                raise ApiError(409, f"request id {t.request_id!r} is in flight already",
                               "invalid_request_error", "request_id_in_flight")
            self.caller_ids.add(claim)
            t.on_end.append(lambda: self.caller_ids.discard(claim))
        return f"{t.request_id[:96]}.{self.client.core.new_id()}"  # type: ignore[union-attr]
