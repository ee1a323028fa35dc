"""Prefix hashes: what lets the broker route a request to the worker that has its prefix cached.

The SDK puts a short list of 8-byte hashes in each generation REQUEST's header (`prefix`); the
broker never unpacks a body, so this is all it knows of the prompt (broker/affinity.py keeps,
per worker, the hashes it sent there, and routes to the longest match). Each hash is chained
over the one before it, so a hash stands for everything up to its point:

- a chat (`messages`): one hash per message (its role, content and tool calls), so turn k+1,
  which resends turn k's messages plus the reply and a new question, matches turn k's last;
- a plain `prompt`: one per full block of BLOCK_BYTES bytes of its UTF-8;
- `prompt_token_ids`: one per full block of BLOCK_TOKENS tokens.

The chain starts from (model, salt): `salt` is the request's prefix-cache salt (its tenant, or
an explicit `cache_salt`), the same the worker keys its cached blocks with, so two tenants'
identical prompts share neither a hash nor a cached block: routing and cached_tokens reveal
nothing across tenants. At most MAX_PREFIX_HASHES are sent: the first (the
SDK picks a conversation's broker by it) and the deepest (a turn shares the previous turn's
deepest hash, so those are the ones that match).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from zeroserve.protocol import MAX_PREFIX_HASHES

BLOCK_BYTES = 128
BLOCK_TOKENS = 32
HASH_BYTES = 8


def _chain(prev: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_BYTES, key=prev).digest()


def _message_bytes(message: Any) -> bytes:
    if not isinstance(message, dict):
        return repr(message).encode()
    parts = [message.get("role"), message.get("content"), message.get("tool_calls"),
             message.get("tool_call_id")]
    return json.dumps(parts, sort_keys=True, default=str).encode()


def salt(tenant: str, cache_salt: Any) -> str:
    """The prefix-cache salt of a request: the caller's own `cache_salt` (tenants that share
    one share their cache, on purpose), else its tenant; the two never coincide, so no caller
    can name another tenant's salt."""
    if isinstance(cache_salt, str) and cache_salt:
        return f"salt:{cache_salt}"
    return f"tenant:{tenant}" if tenant else ""


def hashes(model: str, tenant: str, body: dict[str, Any]) -> list[bytes]:
    """The deepest prefix hashes of a generation body ([] when it has no prompt)."""
    messages, prompt, ids = body.get("messages"), body.get("prompt"), body.get("prompt_token_ids")
    if isinstance(messages, list):
        pieces = [_message_bytes(m) for m in messages]
    elif isinstance(prompt, str):
        data = prompt.encode()
        step = BLOCK_BYTES
        pieces = [data[i:i + step] for i in range(0, len(data) - step + 1, step)]
    elif isinstance(ids, list):
        step = BLOCK_TOKENS
        pieces = [repr(ids[i:i + step]).encode() for i in range(0, len(ids) - step + 1, step)]
    else:
        return []
    h = _chain(b"zeroserve-prefix", f"{model}\0{tenant}".encode())
    out = []
    for piece in pieces:
        h = _chain(h, piece)
        out.append(h)
    # the first (which names the conversation: its client picks a broker by it) and the
    # deepest (what matches the previous turn)
    return out if len(out) <= MAX_PREFIX_HASHES else out[:1] + out[1 - MAX_PREFIX_HASHES:]
