"""Prefix hashes: what lets the broker route a request to the worker that has its prefix cached.

The SDK puts a short list of 8-byte hashes in each generation REQUEST's header (`prefix`); the
broker never unpacks a body, so this is all it knows of the prompt (broker/affinity.py keeps,
per worker, the hashes it sent there, and routes to the longest match). Each hash is a
running hash of everything up to its point (one blake2b over the prompt, its state copied at
each point sent: the cost is the prompt's bytes in C, not a Python call per block):

- a chat (`messages`): one hash per message (its role, content and tool calls), so turn k+1,
  which resends turn k's messages plus the reply and a new question, matches turn k's last;
- a plain `prompt`: one per full block of BLOCK_BYTES bytes of its UTF-8;
- `prompt_token_ids`: one per full block of BLOCK_TOKENS tokens (as 8-byte integers).

The hash starts from (model, salt): `salt` is the request's prefix-cache salt (its tenant, or
an explicit `cache_salt`), the same the worker keys its cached blocks with, so two tenants'
identical prompts share neither a hash nor a cached block: routing and cached_tokens reveal
nothing across tenants. At most MAX_PREFIX_HASHES are sent: the first (the
SDK picks a conversation's broker by it) and the deepest (a turn shares the previous turn's
deepest hash, so those are the ones that match).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from array import array
from typing import Any

from zeroserve.protocol import MAX_PREFIX_HASHES

BLOCK_BYTES = 128
BLOCK_TOKENS = 32
HASH_BYTES = 8


def _message_bytes(message: Any) -> bytes:
    if not isinstance(message, dict):
        return repr(message).encode()
    parts = [message.get("role"), message.get("content"), message.get("tool_calls"),
             message.get("tool_call_id")]
    data = json.dumps(parts, sort_keys=True, default=str).encode()
    return len(data).to_bytes(8, "big") + data  # length-prefixed: pieces cannot run together


def salt(tenant: str, cache_salt: Any) -> str:
    """The prefix-cache salt of a request: the caller's own `cache_salt` (tenants that share
    one share their cache, on purpose), else its tenant; the two never coincide, so no caller
    can name another tenant's salt."""
    if isinstance(cache_salt, str) and cache_salt:
        return f"salt:{cache_salt}"
    return f"tenant:{tenant}" if tenant else ""


def _pieces(body: dict[str, Any]) -> tuple[bytes, list[int]] | None:
    """A prompt's bytes and where each of its pieces ends (None: no prompt to hash)."""
    messages, prompt, ids = body.get("messages"), body.get("prompt"), body.get("prompt_token_ids")
    if isinstance(messages, list):
        parts = [_message_bytes(m) for m in messages]
        return b"".join(parts), list(itertools.accumulate(map(len, parts)))
    if isinstance(prompt, str):
        data, step = prompt.encode(), BLOCK_BYTES
    elif isinstance(ids, list):
        try:
            data, step = array("q", ids).tobytes(), BLOCK_TOKENS * 8
        except (TypeError, OverflowError):
            return None  # not token ids: the worker refuses the request
    else:
        return None
    return data, list(range(step, len(data) + 1, step))


def hashes(model: str, tenant: str, body: dict[str, Any]) -> list[bytes]:
    """The prefix hashes of a generation body ([] when it has no prompt): the first piece's
    (which names the conversation: its client picks a broker by it) and the deepest (what
    matches the previous turn), at most MAX_PREFIX_HASHES."""
    found = _pieces(body)
    if found is None:
        return []
    data, ends = found
    if len(ends) > MAX_PREFIX_HASHES:
        ends = ends[:1] + ends[1 - MAX_PREFIX_HASHES:]
    h = hashlib.blake2b(digest_size=HASH_BYTES, person=b"zs-prefix")
    for name in (model, tenant):
        raw = name.encode()
        h.update(len(raw).to_bytes(8, "big") + raw)
    view, at, out = memoryview(data), 0, []
    for end in ends:
        h.update(view[at:end])
        at = end
        out.append(h.copy().digest())
    return out
