"""The generation request contract, written once: each parameter's default and limits, and
the shapes of what comes back. The gateway's schemas (gateway/schemas.py), the SDK's check
(client.py) and the engine's parse (workers/llm/params.py) all read them from here, so a
default or a bound cannot differ between the three. Pure data: no torch, no IO.

Request body of a generation (what the SDK and the gateway send a worker):
  prompt | prompt_token_ids | messages   the input (engine.py)
  every name in NUMBERS                  a number within its bounds; absent: its default
  stop: [str] (MAX_STOP strings of at most MAX_STOP_CHARS), stop_token_ids: [id]
  (MAX_STOP_TOKEN_IDS), ignore_eos: bool, logit_bias: {"id": bias} (MAX_LOGIT_BIAS entries
  within +-LOGIT_BIAS_LIMIT), response_format, tools (MAX_TOOLS), resume, cache_salt: str
  (MAX_CACHE_SALT; prefix.salt: the SDK sets it from the tenant unless the caller names one);
  priority (in NUMBERS) also travels in the REQUEST header, for the broker's queue, and so
  does deadline (the SDK's: now + timeout): past it a queued request fails with TIMEOUT and
  costs no compute, a running one finishes with finish_reason "timeout" and what it made

Replies (Delta on each CHUNK, Finish added on END): the TypedDicts below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict


@dataclass(frozen=True)
class Bounds:
    default: float | int | None
    lo: float | int
    hi: float | int
    integer: bool = False

    def check(self, name: str, value: Any) -> None:
        """ValueError naming the field unless `value` is a number within the bounds."""
        kinds = int if self.integer else int | float
        if isinstance(value, bool) or not isinstance(value, kinds) or not (
                self.lo <= value <= self.hi):
            what = "an integer" if self.integer else "a number"
            raise ValueError(f"{name} must be {what} in [{self.lo}, {self.hi}]")


I64 = 1 << 63
NUMBERS: dict[str, Bounds] = {
    "max_tokens": Bounds(16, 1, 1 << 20, integer=True),
    "temperature": Bounds(1.0, 0.0, 2.0),
    "top_p": Bounds(1.0, 1e-6, 1.0),
    "top_k": Bounds(0, -1, 1 << 20, integer=True),  # 0 and -1: no cut; the engine caps at vocab
    "seed": Bounds(None, -I64, I64 - 1, integer=True),
    "presence_penalty": Bounds(0.0, -2.0, 2.0),
    "frequency_penalty": Bounds(0.0, -2.0, 2.0),
    "repetition_penalty": Bounds(1.0, 0.01, 10.0),
    "min_tokens": Bounds(0, 0, 1 << 20, integer=True),  # and at most max_tokens
    "logprobs": Bounds(None, 0, 20, integer=True),  # alternatives per token; None: none
    # scheduling: lower runs first (vLLM's meaning); a gateway key may set a floor
    "priority": Bounds(0, -(1 << 31), (1 << 31) - 1, integer=True),
    # seconds it may take from now: the SDK turns it into `deadline` (wall-clock seconds),
    # which the broker (queued) and the engine (queued or running) honour
    "timeout": Bounds(None, 0.001, 86400.0),
    "n": Bounds(1, 1, 8, integer=True),  # choices (the gateway sends one request each)
}
MAX_PROMPTS = 16  # prompts one /v1/completions request may batch (each choice a request)
DEADLINE = Bounds(None, 0.0, float(1 << 40))  # what the SDK sends for a timeout (see above)
ENGINE_FREE = ("n", "timeout")  # numbers the gateway or SDK resolve: no engine sees them


class GenerationBody(TypedDict, total=False):
    """A generation request as the wire carries it to an LLM worker: every field it may have,
    typed. Numbers keep the bounds and defaults of NUMBERS; an absent field is its default.
    The engine refuses any other key by name (LLM_FIELDS); the SDK builds these from the
    keywords of generate/stream/chat (SDK_FIELDS); the gateway maps OpenAI bodies onto them
    (gateway/schemas.py `engine_body`)."""

    prompt: str
    prompt_token_ids: list[int]
    messages: list[dict[str, Any]]
    add_generation_prompt: bool
    tools: list[dict[str, Any]]
    response_format: dict[str, Any]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_tokens: int
    logprobs: int
    priority: int
    deadline: float  # wall-clock seconds: the SDK's now + timeout
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    logit_bias: dict[str, float]
    cache_salt: str
    resume: dict[str, Any]  # {"token_ids": [...]}: what a resumed generation already made
    op: str  # a text op instead of a generation: "tokenize" or "detokenize"
    tokens: list[int]  # detokenize's input


# every field an LLM worker reads from a body: anything else is refused by name (a typo such
# as max_token= fails loudly instead of being ignored)
LLM_FIELDS = frozenset(GenerationBody.__annotations__)
# the keywords of the SDK's generate, stream and chat: the engine's fields less those the SDK
# sets itself, plus the numbers it resolves; anything else is refused before it is sent
SDK_FIELDS = (LLM_FIELDS | frozenset(ENGINE_FREE)) - {"deadline", "op", "tokens", "resume"}


def unknown_fields(body: dict[str, Any], known: frozenset[str]) -> str | None:
    """The error naming a body's fields that are not in `known` (with the closest known name
    for each), or None."""
    import difflib

    odd = sorted(k for k in body if k not in known)
    if not odd:
        return None
    hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
        str(k), known, 1)) else str(k) for k in odd[:8]]
    return f"unknown field{'s' if len(odd) > 1 else ''}: {', '.join(hints)}"
CHAT_MAX_TOKENS = 256  # max_tokens of a chat completion that names none (OpenAI: the rest)
MAX_STOP = 16
MAX_STOP_CHARS = 1000
MAX_STOP_TOKEN_IDS = 16
MAX_LOGIT_BIAS = 300  # entries (OpenAI's limit)
LOGIT_BIAS_LIMIT = 100
MAX_TOOLS = 64
MAX_CACHE_SALT = 256
MAX_MESSAGES = 2048  # in one chat (also bounds the cost of parsing a body before any check)
MAX_CONTENT_PARTS = 64  # in one message


def default(name: str) -> Any:
    return NUMBERS[name].default


def choices(body: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The body of each of a request's n choices (each is a request of its own): choice i of
    a seeded one is seeded seed + i, wrapping within int64, so one seed reproduces them all."""
    seed = body.get("seed")
    return [body if seed is None or not i else
            {**body, "seed": (seed + i + (1 << 63)) % (1 << 64) - (1 << 63)} for i in range(n)]


def check(params: dict[str, Any]) -> None:
    """The SDK's check before sending: every number in NUMBERS within its bounds, stop and
    logit_bias within theirs. ValueError names the first field that is not."""
    for name, value in params.items():
        if name in NUMBERS and value is not None:
            NUMBERS[name].check(name, value)
    stop = params.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list | tuple) or len(stops) > MAX_STOP or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop must be a string or a list of up to {MAX_STOP} non-empty "
                             f"strings of at most {MAX_STOP_CHARS} characters")
    salt = params.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or len(salt) > MAX_CACHE_SALT):
        raise ValueError(f"cache_salt must be a string of at most {MAX_CACHE_SALT} characters")
    bias = params.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS or not all(
            isinstance(v, int | float) and not isinstance(v, bool)
            and abs(v) <= LOGIT_BIAS_LIMIT for v in bias.values())):
        raise ValueError(f"logit_bias must map up to {MAX_LOGIT_BIAS} token ids to numbers in "
                         f"[-{LOGIT_BIAS_LIMIT}, {LOGIT_BIAS_LIMIT}]")


class Alternative(TypedDict):
    token_id: int
    logprob: float
    token: str


class Logprob(TypedDict):
    """One generated token's logprob and the top alternatives asked for."""

    token_id: int
    token: str
    logprob: float
    top: list[Alternative]


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: NotRequired[int]  # prompt tokens served from the prefix cache


class Delta(TypedDict):
    """A CHUNK: the text and token ids since the last one."""

    text: str
    token_ids: list[int]
    logprobs: NotRequired[list[Logprob]]


class Finish(TypedDict):
    """What an END adds to its last Delta."""

    finish_reason: str  # stop, length, cancelled
    usage: Usage
    queue_ms: NotRequired[float]
