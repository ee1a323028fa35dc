"""Per-request sampling parameters, validated from an untrusted request body against the
contract's defaults and bounds (zeroserve/contract.py)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from zeroserve import contract as c
from zeroserve import protocol as p
from zeroserve.workers.engine import EngineError
from zeroserve.workers.llm.grammar import GrammarError, parse_response_format


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = c.default("max_tokens")
    temperature: float = c.default("temperature")
    top_p: float = c.default("top_p")
    top_k: int = c.default("top_k")
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    schema: dict[str, Any] | None = None  # structured output: a JSON schema to follow
    presence_penalty: float = c.default("presence_penalty")  # logits.py for these five
    frequency_penalty: float = c.default("frequency_penalty")
    repetition_penalty: float = c.default("repetition_penalty")
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = c.default("min_tokens")
    priority: int = c.default("priority")  # scheduling, not sampling: lower runs first
    deadline: float | None = None  # wall-clock seconds: past it, stop (contract.py)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _bad(msg: str) -> EngineError:
    return EngineError(p.BAD_REQUEST, msg)


def _value(body: dict[str, Any], key: str, hi: float | None = None) -> Any:
    """body[key] within the contract's bounds for it (and at most `hi`), or its default."""
    v = body.get(key)
    bounds = c.DEADLINE if key == "deadline" else c.NUMBERS[key]
    if v is None:
        return bounds.default
    try:
        bounds.check(key, v)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if hi is not None and v > hi:
        raise _bad(f"{key} must be at most {hi}")
    return float(v) if not bounds.integer else v


def parse(body: dict[str, Any], vocab_size: int) -> SamplingParams:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if (not isinstance(stop, list | tuple) or len(stop) > c.MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= c.MAX_STOP_CHARS for s in stop)):
        raise _bad(f"stop must be a string or a list of up to {c.MAX_STOP} non-empty strings")
    stop_ids = body.get("stop_token_ids") or ()
    if not isinstance(stop_ids, list | tuple) or len(stop_ids) > c.MAX_STOP_TOKEN_IDS or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in stop_ids
    ):
        raise _bad("stop_token_ids must be a list of token ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos must be a boolean")
    try:
        schema = parse_response_format(body.get("response_format"))
    except GrammarError as exc:
        raise _bad(str(exc)) from None
    max_tokens = _value(body, "max_tokens")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_value(body, "temperature"),
        top_p=_value(body, "top_p"),
        top_k=min(max(0, _value(body, "top_k")), vocab_size),
        seed=_value(body, "seed"),
        stop=tuple(stop),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=ignore_eos,
        logprobs=_value(body, "logprobs"),
        schema=schema,
        presence_penalty=_value(body, "presence_penalty"),
        frequency_penalty=_value(body, "frequency_penalty"),
        repetition_penalty=_value(body, "repetition_penalty"),
        logit_bias=_logit_bias(body.get("logit_bias"), vocab_size),
        min_tokens=_value(body, "min_tokens", hi=max_tokens),
        priority=_value(body, "priority"),
        deadline=_value(body, "deadline"),
    )


def _logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} (string keys, as in JSON) -> ((id, bias), ...)."""
    if not value:
        return ()
    if not isinstance(value, dict) or len(value) > c.MAX_LOGIT_BIAS:
        raise _bad(f"logit_bias must map up to {c.MAX_LOGIT_BIAS} token ids to biases")
    out = []
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else -1
        if not 0 <= token < vocab_size:
            raise _bad(f"logit_bias: {str(key)[:20]!r} is not a token id below {vocab_size}")
        limit = c.LOGIT_BIAS_LIMIT
        if isinstance(bias, bool) or not isinstance(bias, int | float) or abs(bias) > limit:
            raise _bad(f"logit_bias values must be numbers in [-{limit}, {limit}]")
        out.append((token, float(bias)))
    return tuple(out)


def parse_resume(body: dict[str, Any], vocab_size: int, max_tokens: int) -> tuple[list[int], int]:
    """`resume`: the token ids and text length a client already has from a lost worker."""
    resume = body.get("resume")
    if resume is None:
        return [], 0
    ids = resume.get("token_ids") if isinstance(resume, dict) else None
    chars = resume.get("text_chars") if isinstance(resume, dict) else None
    if (not isinstance(ids, list) or len(ids) >= max_tokens or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids)
            or isinstance(chars, bool) or not isinstance(chars, int) or chars < 0):
        raise _bad("resume must be {token_ids: fewer than max_tokens token ids, text_chars: "
                   "int >= 0}")
    return ids, chars


def parse_cache_salt(body: dict[str, Any]) -> bytes:
    """`cache_salt` (the SDK sets it from the tenant, or the caller's own): the seed its
    prefix blocks' keys chain from, so a prefix cached for one salt is never another's hit."""
    salt = body.get("cache_salt")
    if salt is None or salt == "":
        return b""
    if not isinstance(salt, str) or len(salt) > c.MAX_CACHE_SALT:
        raise _bad(f"cache_salt must be a string of at most {c.MAX_CACHE_SALT} characters")
    return hashlib.blake2b(salt.encode(), digest_size=16, person=b"zs-cache-salt").digest()
