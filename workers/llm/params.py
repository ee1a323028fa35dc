"""Per-request sampling parameters, validated from an untrusted request body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zeroserve.workers.engine import EngineError
from zeroserve.workers.llm.grammar import GrammarError, parse_response_format

from zeroserve import protocol as p

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300  # entries (OpenAI's limit), each within +-100


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    schema: dict[str, Any] | None = None  # structured output: a JSON schema to follow
    presence_penalty: float = 0.0  # logits.py for these five
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _bad(msg: str) -> EngineError:
    return EngineError(p.BAD_REQUEST, msg)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise _bad(f"{key} must be a number in [{lo}, {hi}]")
    return float(v)


def _int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"{key} must be an integer in [{lo}, {hi}]")
    return v


def parse(body: dict[str, Any], vocab_size: int) -> SamplingParams:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if (not isinstance(stop, list | tuple) or len(stop) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stop)):
        raise _bad(f"stop must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings")
    stop_ids = body.get("stop_token_ids") or ()
    if not isinstance(stop_ids, list | tuple) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in stop_ids
    ):
        raise _bad("stop_token_ids must be a list of token ids")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos must be a boolean")
    top_k = _int(body, "top_k", 0, -1, vocab_size)
    try:
        schema = parse_response_format(body.get("response_format"))
    except GrammarError as exc:
        raise _bad(str(exc)) from None
    max_tokens = _int(body, "max_tokens", 16, 1, 1 << 20)
    return SamplingParams(
        max_tokens=max_tokens,  # type: ignore[arg-type]
        temperature=_number(body, "temperature", 1.0, 0.0, 100.0),
        top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
        top_k=max(0, top_k or 0),
        seed=_int(body, "seed", None, -(1 << 63), (1 << 63) - 1),
        stop=tuple(stop),
        stop_token_ids=tuple(stop_ids),
        ignore_eos=ignore_eos,
        logprobs=_int(body, "logprobs", None, 0, MAX_LOGPROBS),
        schema=schema,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        logit_bias=_logit_bias(body.get("logit_bias"), vocab_size),
        min_tokens=_int(body, "min_tokens", 0, 0, max_tokens),  # type: ignore[arg-type]
    )


def _logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """{"token id": bias} (string keys, as in JSON) -> ((id, bias), ...)."""
    if not value:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _bad(f"logit_bias must map up to {MAX_LOGIT_BIAS} token ids to biases")
    out = []
    for key, bias in value.items():
        token = int(key) if isinstance(key, str) and key.isdigit() else -1
        if not 0 <= token < vocab_size:
            raise _bad(f"logit_bias: {str(key)[:20]!r} is not a token id below {vocab_size}")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise _bad("logit_bias values must be numbers in [-100, 100]")
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
