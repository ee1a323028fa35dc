"""OpenAI response shapes: JSON bodies and SSE events, built from zeroserve results.

Pure formatting, no IO. Streaming events are written from a pre-rendered head (id, created,
model, object) plus small templates, which is cheaper per token than dumping a dict.
"""

from __future__ import annotations

import json
from typing import Any


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def finish_reason(reason: str | None) -> str | None:
    """OpenAI has no 'cancelled': a cancelled request simply stopped."""
    return "stop" if reason == "cancelled" else reason


def usage_of(data: dict[str, Any]) -> dict[str, Any]:
    usage = data.get("usage") or {}
    p, c = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    out: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if "cached_tokens" in usage:  # prompt tokens served from the worker's prefix cache
        out["prompt_tokens_details"] = {"cached_tokens": usage["cached_tokens"]}
    return out


def completion_logprobs(lps: list[dict[str, Any]], start: int = 0) -> dict[str, Any]:
    """The legacy completions shape: parallel lists per token."""
    offsets, pos = [], start
    for lp in lps:
        offsets.append(pos)
        pos += len(lp["token"])
    return {"tokens": [lp["token"] for lp in lps],
            "token_logprobs": [lp["logprob"] for lp in lps],
            "top_logprobs": [{tok: v for _, v, tok in lp["top"]} for lp in lps],
            "text_offset": offsets}


def chat_logprobs(lps: list[dict[str, Any]]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(lp["token"], lp["logprob"]),
                         "top_logprobs": [entry(tok, v) for _, v, tok in lp["top"]]}
                        for lp in lps]}


def completion_body(meta: dict[str, Any], chat: bool, text: str, data: dict[str, Any],
                    lps: list[dict[str, Any]] | None) -> bytes:
    """A whole (non-streamed) completion or chat completion."""
    fin = finish_reason(data.get("finish_reason"))
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": chat_logprobs(lps) if lps is not None else None,
                  "finish_reason": fin}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text,
                  "logprobs": completion_logprobs(lps) if lps is not None else None,
                  "finish_reason": fin}
        obj = "text_completion"
    return _dumps({**meta, "object": obj, "choices": [choice],
                   "usage": usage_of(data)}).encode()


class SseEvents:
    """The SSE events of one stream: role (chat), content deltas, finish, usage, [DONE]."""

    DONE = b"data: [DONE]\n\n"

    def __init__(self, meta: dict[str, Any], chat: bool) -> None:
        self.chat = chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.head = _dumps({**meta, "object": obj})[:-1]  # without the closing brace
        self.offset = 0  # text offset for completions logprobs

    def _event(self, choice: str) -> bytes:
        return f'data: {self.head},"choices":[{choice}]}}\n\n'.encode()

    def role(self) -> bytes:
        return self._event('{"index":0,"delta":{"role":"assistant","content":""},'
                           '"logprobs":null,"finish_reason":null}')

    def content(self, text: str, finish: str | None = None,
                lps: list[dict[str, Any]] | None = None) -> bytes:
        fin = json.dumps(finish_reason(finish))
        logprobs = "null"
        if lps:
            shaped = chat_logprobs(lps) if self.chat else completion_logprobs(lps, self.offset)
            self.offset += sum(len(lp["token"]) for lp in lps)
            logprobs = _dumps(shaped)
        if self.chat:
            delta = f'{{"content":{json.dumps(text)}}}' if text else "{}"
            return self._event(f'{{"index":0,"delta":{delta},"logprobs":{logprobs},'
                               f'"finish_reason":{fin}}}')
        return self._event(f'{{"index":0,"text":{json.dumps(text)},"logprobs":{logprobs},'
                           f'"finish_reason":{fin}}}')

    def usage(self, data: dict[str, Any]) -> bytes:
        return f'data: {self.head},"choices":[],"usage":{_dumps(usage_of(data))}}}\n\n'.encode()

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return f"data: {_dumps(body)}\n\n".encode()
