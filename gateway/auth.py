"""API keys: loaded from a file or the environment, kept only as SHA-256 hashes, compared in
constant time.

Key file (JSON):
    {"keys": [{"id": "team-a", "key": "sk-...", "models": ["tiny"], "rps": 10, "tpm": 60000},
              {"id": "ops", "sha256": "<hex of the key>", "admin": true}]}
Environment: ZEROSERVE_API_KEYS="team-a:sk-...,ops:sk-..." (every model, default limits).
"models" absent means every model; "rps"/"tpm" absent means the gateway's defaults; an
"admin" key also sees the figures that would tell one tenant about another's traffic (the
prefix-cache counters on /metrics); "priority" is its requests' default priority and the most
urgent (lowest) one they may ask for; "timeout" the deadline (seconds) of its requests that
name none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ApiKey:
    id: str
    digest: bytes
    models: frozenset[str] | None = None
    rps: float | None = None
    tpm: float | None = None
    admin: bool = False
    priority: int | None = None  # its requests' default, and the most urgent they may ask
    timeout: float | None = None  # its requests' default deadline, in seconds from arrival

    def priority_of(self, asked: int | None) -> int | None:
        """A request's priority under this key: its own if no more urgent than the key's."""
        if self.priority is None:
            return asked
        return self.priority if asked is None else max(asked, self.priority)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def _priority(entry: dict) -> int | None:
    value = entry.get("priority")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"key {entry.get('id')!r}: priority must be an integer")
    return value


def _timeout(entry: dict) -> float | None:
    value = entry.get("timeout")
    if value is not None:
        from zeroserve.contract import NUMBERS

        NUMBERS["timeout"].check(f"key {entry.get('id')!r}: timeout", value)
    return value


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyStore:
    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def load(cls, path: str | None = None, env: str | None = None) -> KeyStore:
        keys: list[ApiKey] = []
        if path:
            data = json.loads(Path(path).read_text())
            for entry in data.get("keys", []):
                if "sha256" in entry:
                    digest = bytes.fromhex(entry["sha256"])
                else:
                    digest = _digest(entry["key"])
                models = entry.get("models")
                keys.append(ApiKey(str(entry["id"]), digest,
                                   frozenset(models) if models is not None else None,
                                   entry.get("rps"), entry.get("tpm"),
                                   entry.get("admin") is True, _priority(entry),
                                   _timeout(entry)))
        env = os.environ.get("ZEROSERVE_API_KEYS", "") if env is None else env
        for item in filter(None, (s.strip() for s in env.split(","))):
            key_id, _, secret = item.partition(":")
            if not secret:
                raise ValueError("ZEROSERVE_API_KEYS entries look like id:key")
            keys.append(ApiKey(key_id, _digest(secret)))
        return cls(keys)

    def check(self, authorization: str | None) -> ApiKey | None:
        """The key behind an `Authorization: Bearer ...` header, or None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        digest = _digest(authorization[7:].strip())
        found = None
        for key in self.keys:  # compare with every key: no early exit to time
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found
