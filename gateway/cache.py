"""Exact-match response cache for deterministic requests: LRU with a TTL and a byte bound."""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any


def cache_key(route: str, body: dict[str, Any], tenant: str) -> str | None:
    """A key for deterministic requests (greedy, or a fixed seed); None for the others.
    Keys are per tenant (API key id): a hit must not tell one tenant what another asked."""
    temperature = body.get("temperature", 1.0)
    if temperature not in (0, 0.0) and body.get("seed") is None:
        return None
    canon = json.dumps({"route": route, "tenant": tenant, **{k: v for k, v in body.items()
                                           if k not in ("stream", "stream_options", "user")}},
                       sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class ResponseCache:
    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.ttl_s > 0

    def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        stored, value = item
        if time.monotonic() - stored > self.ttl_s:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._items:
            self._drop(key)
        self._items[key] = (time.monotonic(), value)
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        _, value = self._items.pop(key)
        self.bytes -= len(value)
