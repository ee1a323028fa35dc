"""OpenAI request schemas (pydantic) and their mapping onto zeroserve request bodies.

Only the request side is modelled: it is what needs validating. Responses are built in
openai_shapes.py, in exactly OpenAI's shapes, which is cheaper on the streaming hot path.
Unknown fields are refused (400), never silently dropped: a client that asks for
`response_format` or `tools` must not get plain text back as if it had been honoured. Sizes
are bounded with the engines' own limits (config.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zeroserve import contract as c
from zeroserve.config import MAX_EMBED_INPUTS, MAX_EMBED_TEXT_CHARS, MAX_PROMPT_CHARS
from zeroserve.gateway.tools import forced_schema

# OpenAI request fields this server does not implement yet: named in the 400, not ignored.
UNSUPPORTED = ("functions", "function_call", "best_of", "suffix", "audio", "modalities",
               "prediction", "dimensions")


TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]


def number(name: str, default: Any = ...) -> Any:
    """A field with the contract's bounds for `name` (zeroserve/contract.py) and its default
    (or `default`)."""
    b = c.NUMBERS[name]
    return Field(default=b.default if default is ... else default, ge=b.lo, le=b.hi)

Stop = Annotated[str, Field(min_length=1, max_length=c.MAX_STOP_CHARS)]
Tag = Annotated[str, Field(max_length=512)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            asked = [k for k in UNSUPPORTED if data.get(k) not in (None, 0, {}, [])]
            if asked:
                raise ValueError(f"{', '.join(asked)}: not supported by this server yet")
            data = {k: v for k, v in data.items() if k not in UNSUPPORTED}  # defaults: fine
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(Strict):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = number("max_tokens", None)  # None: the route's default
    temperature: float = number("temperature")
    top_p: float = number("top_p")
    top_k: int | None = number("top_k", None)
    n: int = number("n")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=c.MAX_STOP)] | None = None
    metadata: dict[Tag, Tag] | None = Field(default=None, max_length=16)  # accepted, not used
    seed: int | None = number("seed")
    ignore_eos: bool = False
    user: Tag | None = None
    presence_penalty: float = number("presence_penalty")
    frequency_penalty: float = number("frequency_penalty")
    repetition_penalty: float = number("repetition_penalty")
    logit_bias: dict[Annotated[str, Field(pattern=r"^\d{1,9}$")],
                     Annotated[float, Field(ge=-c.LOGIT_BIAS_LIMIT, le=c.LOGIT_BIAS_LIMIT)]
                     ] | None = Field(default=None, max_length=c.MAX_LOGIT_BIAS)
    min_tokens: int = number("min_tokens")
    priority: int = number("priority")  # vLLM's: lower first; the key's floor applies
    timeout: float | None = number("timeout", None)  # seconds (or x-request-timeout)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=c.MAX_STOP_TOKEN_IDS)] | None = None
    # vLLM's name: requests with the same salt share cached prefixes (default: the API key's)
    cache_salt: str | None = Field(default=None, min_length=1, max_length=c.MAX_CACHE_SALT)

    def inputs(self) -> list[dict[str, Any]]:
        """What each prompt adds to `engine_body` (a chat's one prompt is in it already)."""
        return [{}]

    def engine_body(self, max_tokens_default: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": self.max_tokens or max_tokens_default,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.top_k:
            body["top_k"] = self.top_k
        if self.stop:
            body["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.seed is not None:
            body["seed"] = self.seed
        if self.ignore_eos:
            body["ignore_eos"] = True
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                              ("repetition_penalty", 1.0), ("min_tokens", 0), ("priority", 0)):
            if getattr(self, name) != neutral:
                body[name] = getattr(self, name)
        if self.logit_bias:
            body["logit_bias"] = self.logit_bias
        if self.stop_token_ids:
            body["stop_token_ids"] = self.stop_token_ids
        if self.cache_salt:
            body["cache_salt"] = self.cache_salt
        if self.timeout is not None:
            body["timeout"] = self.timeout
        return body

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    # one prompt, or a batch of them (OpenAI's list of strings or of token-id lists): each
    # prompt's n choices follow the previous prompt's, indexed on through the reply
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    echo: Literal[False] = False
    logprobs: int | None = number("logprobs")

    def engine_body(self, max_tokens_default: int = c.default("max_tokens")) -> dict[str, Any]:
        """The body every prompt shares (`inputs` holds the prompts)."""
        body = super().engine_body(max_tokens_default)
        if self.logprobs is not None:
            body["logprobs"] = self.logprobs
        return body

    def inputs(self) -> list[dict[str, Any]]:
        """Each prompt as an engine body's prompt field."""
        p = self.prompt
        prompts = [p] if isinstance(p, str) or not p or isinstance(p[0], int) else p
        if len(prompts) > c.MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts; one request batches at most "
                             f"{c.MAX_PROMPTS}")
        if not all(prompts):
            raise ValueError("prompt must not be empty")
        return [{"prompt": x} if isinstance(x, str) else {"prompt_token_ids": x}
                for x in prompts]

    def prompt_chars(self) -> int:
        return _chars(self.prompt)

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, v: str | list[TokenId] | list[str] | list[list[TokenId]]
                 ) -> str | list[TokenId] | list[str] | list[list[TokenId]]:
        n = _chars(v)
        if n > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is {n} characters; the limit is {MAX_PROMPT_CHARS}")
        return v


def _chars(prompt: Any) -> int:
    """A prompt's size in characters, a token id counted as 4."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(_chars(x) if isinstance(x, str | list) else 4 for x in prompt)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(max_length=64)
    arguments: str = Field(default="{}", max_length=MAX_PROMPT_CHARS)


class ToolCall(BaseModel):
    id: str = Field(default="", max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | Annotated[list[ContentPart], Field(max_length=c.MAX_CONTENT_PARTS)] | None = ""
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=c.MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def engine_message(self) -> dict[str, Any]:
        """What the chat template sees: tool calls with their arguments as objects."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "id": c.id, "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = Field(default=None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(BaseModel):
    name: str = Field(max_length=64)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class JsonSchemaFormat(BaseModel):
    name: str = Field(default="output", max_length=64)
    description: str | None = Field(default=None, max_length=4096)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """Structured output: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def engine_field(self) -> dict[str, Any] | None:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format json_schema needs json_schema.schema")
            return {"type": "json_schema", "schema": self.json_schema.schema_}
        return {"type": "json_object"} if self.type == "json_object" else None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=c.MAX_MESSAGES)
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = number("max_tokens", None)
    logprobs: bool = False
    top_logprobs: int | None = number("logprobs")
    tools: list[Tool] | None = Field(default=None, max_length=c.MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; a forced choice makes one call

    def tool_mode(self) -> str | None:
        """None (no tools in play), "auto" (parse the reply) or "forced" (one call, by
        constrained decoding): gateway/tools.py."""
        if not self.tools or self.tool_choice == "none":
            return None
        return "auto" if self.tool_choice in (None, "auto") else "forced"

    def engine_body(self, max_tokens_default: int = c.CHAT_MAX_TOKENS) -> dict[str, Any]:
        body = super().engine_body(max_tokens_default)
        if self.logprobs:
            body["logprobs"] = self.top_logprobs or 0
        if self.max_completion_tokens:
            body["max_tokens"] = self.max_completion_tokens
        body["messages"] = [m.engine_message() for m in self.messages]
        if self.response_format is not None and self.response_format.engine_field():
            body["response_format"] = self.response_format.engine_field()
        mode = self.tool_mode()
        if mode is not None:
            functions = [t.function.model_dump(exclude_none=True) for t in self.tools or ()]
            body["tools"] = [{"type": "function", "function": f} for f in functions]
            if mode == "forced":
                if "response_format" in body:
                    raise ValueError("tool_choice required or a function cannot be combined "
                                     "with response_format")
                if isinstance(self.tool_choice, NamedToolChoice):
                    name = self.tool_choice.function.name
                    functions = [f for f in functions if f["name"] == name]
                    if not functions:
                        raise ValueError(f"tool_choice names {name!r}, which is not in tools")
                body["response_format"] = {"type": "json_schema",
                                           "schema": forced_schema(functions)}
        return body

    def prompt_chars(self) -> int:
        calls = sum(len(c.function.arguments) for m in self.messages for c in m.tool_calls or ())
        shown = len(json.dumps([t.model_dump(exclude_none=True) for t in self.tools])
                    ) if self.tools else 0
        return sum(len(m.text()) for m in self.messages) + calls + shown

    @model_validator(mode="after")
    def _bounded(self) -> ChatCompletionRequest:
        n = self.prompt_chars()
        if n > MAX_PROMPT_CHARS:
            raise ValueError(f"messages hold {n} characters; the limit is {MAX_PROMPT_CHARS}")
        return self


class EmbeddingRequest(Strict):
    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: Tag | None = None

    @field_validator("input")
    @classmethod
    def _bounded(cls, v: str | list[str]) -> str | list[str]:
        texts = [v] if isinstance(v, str) else v
        if len(texts) > MAX_EMBED_INPUTS:
            raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request")
        if any(len(t) > MAX_EMBED_TEXT_CHARS for t in texts):
            raise ValueError(f"each input may hold at most {MAX_EMBED_TEXT_CHARS} characters")
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class TokenizeRequest(Strict):
    """vLLM's /tokenize: a prompt, or chat messages through the model's template."""

    model: str = Field(min_length=1, max_length=256)
    prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1,
                                               max_length=c.MAX_MESSAGES)
    add_generation_prompt: bool = True

    def chars(self) -> int:
        if self.messages is not None:
            return sum(len(m.text()) for m in self.messages)
        return len(self.prompt or "")

    def engine_body(self) -> dict[str, Any]:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give a prompt or messages")
        if self.messages is not None:
            chars = self.chars()
            if chars > MAX_PROMPT_CHARS:
                raise ValueError(f"messages hold {chars} characters; the limit is "
                                 f"{MAX_PROMPT_CHARS}")
            return {"op": "tokenize", "add_generation_prompt": self.add_generation_prompt,
                    "messages": [{"role": "system" if m.role == "developer" else m.role,
                                  "content": m.text()} for m in self.messages]}
        return {"op": "tokenize", "prompt": self.prompt}


class DetokenizeRequest(Strict):
    """vLLM's /detokenize: token ids back to text."""

    model: str = Field(min_length=1, max_length=256)
    tokens: list[TokenId] = Field(max_length=1 << 20)
