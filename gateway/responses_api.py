"""POST /v1/responses: OpenAI's Responses API, text in and out, served as a chat completion.

The request becomes a chat request (ResponsesRequest.chat) and goes through the same
start as /v1/chat/completions (generate.start: auth, rate limits, submit); its reply comes
back as a Response object: one `message` output item holding one `output_text` part, status
`completed` (or `incomplete` with reason `max_output_tokens` when cut by it), usage as input
and output tokens. Streamed, it is OpenAI's typed event sequence, each event
`event: <type>` + `data: {...}` with a sequence_number: response.created,
response.in_progress, response.output_item.added, response.content_part.added,
response.output_text.delta (one per chunk), response.output_text.done,
response.content_part.done, response.output_item.done, response.completed. Nothing is
stored (store is answered false).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zeroserve import contract as c
from zeroserve import errors
from zeroserve.client import Chunk
from zeroserve.gateway.api_errors import ApiError, from_zeroserve
from zeroserve.gateway.generate import (
    SSE_HEADERS,
    Started,
    chain,
    collect,
    first_chunk,
    observe,
    record_usage,
    start,
    unless_disconnected,
)
from zeroserve.gateway.schemas import ChatCompletionRequest, Strict, Tag, number

if TYPE_CHECKING:
    from zeroserve.gateway.gateway import Gateway


class InputPart(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id, status of an earlier output item

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[InputPart], Field(max_length=c.MAX_CONTENT_PARTS)]

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = Field(default="output", max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(Strict):
    """/v1/responses: text in and out, streamed or not. No state is kept on the server: the
    whole conversation comes as `input` (previous_response_id is refused)."""

    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[InputMessage], Field(max_length=c.MAX_MESSAGES)] = Field(
        min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = number("max_tokens", None)
    temperature: float = number("temperature")
    top_p: float = number("top_p")
    stream: bool = False
    text: TextOptions | None = None
    store: bool = False  # accepted, and answered false: nothing is stored
    metadata: dict[Tag, Tag] | None = Field(default=None, max_length=16)
    user: Tag | None = None
    previous_response_id: None = Field(default=None, description="refused: no server state")
    tools: Annotated[list[Any], Field(max_length=0)] = Field(default_factory=list)
    tool_choice: Literal["none", "auto"] = "auto"
    parallel_tool_calls: bool = True
    truncation: Literal["disabled"] = "disabled"

    @model_validator(mode="before")
    @classmethod
    def _stateless(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("previous_response_id"):
            raise ValueError("previous_response_id: this server keeps no responses; send the "
                             "whole conversation as input")
        return data

    def chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (how it is served)."""
        turns = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else [
            {"role": m.role, "content": m.text()} for m in self.input]
        if self.instructions:
            turns.insert(0, {"role": "system", "content": self.instructions})
        fmt = self.text.format if self.text else TextFormat()
        response_format = None
        if fmt.type == "json_schema":
            response_format = {"type": "json_schema", "json_schema": {
                "name": fmt.name, "schema": fmt.schema_ or {}, "strict": fmt.strict}}
        elif fmt.type == "json_object":
            response_format = {"type": "json_object"}
        return ChatCompletionRequest(
            model=self.model, messages=turns, max_tokens=self.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p, stream=self.stream,
            response_format=response_format, user=self.user)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _item(rid: str, text: str | None, status: str) -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{rid}", "status": status, "role": "assistant",
            "content": [] if text is None else [_part(text)]}


def response_object(req: ResponsesRequest, rid: str, created: int, status: str,
                    text: str | None = None, data: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The Response: in progress (no output yet), or done with `text` and its END `data`."""
    usage = None
    incomplete = None
    if data is not None:
        u = data.get("usage") or {}
        p, c = u.get("prompt_tokens", 0), u.get("completion_tokens", 0)
        usage = {"input_tokens": p, "output_tokens": c, "total_tokens": p + c,
                 "input_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
                 "output_tokens_details": {"reasoning_tokens": 0}}
        if data.get("finish_reason") == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text else {
        "type": "text"}
    return {
        "id": f"resp_{rid}", "object": "response", "created_at": created, "status": status,
        "model": req.model, "output": [] if text is None else [_item(rid, text, "completed")],
        "usage": usage, "incomplete_details": incomplete, "error": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "tools": [],
        "tool_choice": req.tool_choice, "parallel_tool_calls": req.parallel_tool_calls,
        "text": {"format": fmt}, "truncation": req.truncation, "store": False,
        "metadata": req.metadata or {}, "user": req.user, "previous_response_id": None,
        "reasoning": None,
    }


async def create(gw: Gateway, request: Request, req: ResponsesRequest) -> Response:
    try:
        chat = req.chat()
    except ValidationError as exc:
        raise ApiError(400, "; ".join(e["msg"] for e in exc.errors()), param="input") from None
    started = await start(gw, request, chat, "/v1/responses", chat=True, cacheable=False)
    assert not isinstance(started, Response)
    handle = started.handles[0]
    rid = started.meta["id"].removeprefix("chatcmpl-")
    created = started.meta["created"]
    if req.stream:
        first, chunks = await first_chunk(gw, request, started)
        return StreamingResponse(_events(gw, req, started, chain(first, chunks)),
                                 media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **started.headers})
    try:
        text, data, _ = await unless_disconnected(
            request, handle, collect(gw, handle, started.t0, started.ticket))
    except errors.ZeroserveError as exc:
        raise from_zeroserve(exc) from None
    gw.metrics.e2e.labels(req.model).observe(time.perf_counter() - started.t0)
    body = response_object(req, rid, created, "completed", text, data)
    return Response(_dumps(body), media_type="application/json", headers=started.headers)


async def _events(gw: Gateway, req: ResponsesRequest, started: Started,
                  chunks: AsyncIterator[Chunk]) -> AsyncIterator[bytes]:
    rid, created = started.meta["id"].removeprefix("chatcmpl-"), started.meta["created"]
    seq = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: {_dumps({'type': kind, 'sequence_number': seq, **fields})}"\
               "\n\n".encode()

    t, t0 = started.ticket, started.t0
    at = {"item_id": f"msg_{rid}", "output_index": 0, "content_index": 0}
    parts: list[str] = []
    try:
        yield event("response.created",
                    response=response_object(req, rid, created, "in_progress"))
        yield event("response.in_progress",
                    response=response_object(req, rid, created, "in_progress"))
        yield event("response.output_item.added", output_index=0,
                    item=_item(rid, None, "in_progress"))
        yield event("response.content_part.added", **at, part=_part(""))
        last = t0
        async for chunk in chunks:
            last = observe(gw, chunk, t0, last, t)
            if chunk.text:
                parts.append(chunk.text)
                yield event("response.output_text.delta", **at, delta=chunk.text, logprobs=[])
            if chunk.final:
                record_usage(gw, t, chunk.data, first=True)
                text = "".join(parts)
                yield event("response.output_text.done", **at, text=text, logprobs=[])
                yield event("response.content_part.done", **at, part=_part(text))
                yield event("response.output_item.done", output_index=0,
                            item=_item(rid, text, "completed"))
                done = response_object(req, rid, created, "completed", text, chunk.data)
                kind = ("response.completed" if done["status"] == "completed"
                        else "response.incomplete")
                yield event(kind, response=done)
        gw.metrics.e2e.labels(req.model).observe(time.perf_counter() - t0)
    except errors.ZeroserveError as exc:  # the stream has started: report in-band
        err = from_zeroserve(exc).body()["error"]
        yield event("error", code=err.get("code"), message=err.get("message"), param=None)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]  # cancels it if unfinished
