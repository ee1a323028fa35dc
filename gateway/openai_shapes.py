"""OpenAI response shapes: JSON bodies and SSE events, built from zeroserve results.

Pure formatting, no IO. Streaming events are written from a pre-rendered head (id, created,
model, object) plus small templates, which is cheaper per token than dumping a dict.
"""

from __future__ import annotations

import json
from typing import Any

from zeroserve.gateway import tools


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def finish_reason(reason: str | None) -> str | None:
    """OpenAI has no 'cancelled': a cancelled request simply stopped."""
    return "stop" if reason == "cancelled" else reason


def usage_of(datas: list[dict[str, Any]], n: int = 1) -> dict[str, Any]:
    """The usage of every choice, in order, n to a prompt: each prompt once, every
    completion added up."""
    usages = [d.get("usage") or {} for d in datas]
    prompts = usages[::n]
    p = sum(u.get("prompt_tokens", 0) for u in prompts)
    c = sum(u.get("completion_tokens", 0) for u in usages)
    out: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if prompts and "cached_tokens" in prompts[0]:  # prompt tokens from the prefix cache
        out["prompt_tokens_details"] = {
            "cached_tokens": sum(u.get("cached_tokens", 0) for u in prompts)}
    return out


def completion_logprobs(lps: list[dict[str, Any]], start: int = 0) -> dict[str, Any]:
    """The legacy completions shape: parallel lists per token."""
    offsets, pos = [], start
    for lp in lps:
        offsets.append(pos)
        pos += len(lp["token"])
    return {"tokens": [lp["token"] for lp in lps],
            "token_logprobs": [lp["logprob"] for lp in lps],
            "top_logprobs": [{a["token"]: a["logprob"] for a in lp["top"]} for lp in lps],
            "text_offset": offsets}


def chat_logprobs(lps: list[dict[str, Any]]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(lp["token"], lp["logprob"]),
                         "top_logprobs": [entry(a["token"], a["logprob"]) for a in lp["top"]]}
                        for lp in lps]}


def completion_body(meta: dict[str, Any], chat: bool,
                    choices: list[tuple[str, dict[str, Any], list[dict[str, Any]]]],
                    with_logprobs: bool, n: int = 1, tool_mode: str | None = None) -> bytes:
    """A whole (non-streamed) completion or chat completion: (text, END fields, logprobs) of
    each choice, n to a prompt; with tools in play (tool_mode, gateway/tools.py) the text
    may be calls."""
    out = []
    for i, (text, data, lps) in enumerate(choices):
        fin = finish_reason(data.get("finish_reason"))
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_mode is not None:
                content, calls = tools.parse(text, tool_mode == "forced", f"{meta['id']}_{i}")
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
                    fin = "tool_calls" if fin == "stop" else fin
            out.append({"index": i, "message": message,
                        "logprobs": chat_logprobs(lps) if with_logprobs else None,
                        "finish_reason": fin})
        else:
            out.append({"index": i, "text": text,
                        "logprobs": completion_logprobs(lps) if with_logprobs else None,
                        "finish_reason": fin})
    obj = "chat.completion" if chat else "text_completion"
    return _dumps({**meta, "object": obj, "choices": out,
                   "usage": usage_of([d for _, d, _ in choices], n)}).encode()


class SseEvents:
    """The SSE events of one stream: role (chat), content deltas, finish, usage, [DONE]."""

    DONE = b"data: [DONE]\n\n"

    def __init__(self, meta: dict[str, Any], chat: bool) -> None:
        self.chat = chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.head = _dumps({**meta, "object": obj})[:-1]  # without the closing brace
        self.offsets: dict[int, int] = {}  # text offset of each choice, for completions

    def _event(self, choice: str) -> bytes:
        return f'data: {self.head},"choices":[{choice}]}}\n\n'.encode()

    def role(self, index: int = 0) -> bytes:
        return self._event(f'{{"index":{index},"delta":{{"role":"assistant","content":""}},'
                           '"logprobs":null,"finish_reason":null}')

    def content(self, text: str, finish: str | None = None,
                lps: list[dict[str, Any]] | None = None, index: int = 0) -> bytes:
        fin = json.dumps(finish_reason(finish))
        logprobs = "null"
        if lps:
            offset = self.offsets.get(index, 0)
            shaped = chat_logprobs(lps) if self.chat else completion_logprobs(lps, offset)
            self.offsets[index] = offset + sum(len(lp["token"]) for lp in lps)
            logprobs = _dumps(shaped)
        if self.chat:
            delta = f'{{"content":{json.dumps(text)}}}' if text else "{}"
            return self._event(f'{{"index":{index},"delta":{delta},"logprobs":{logprobs},'
                               f'"finish_reason":{fin}}}')
        return self._event(f'{{"index":{index},"text":{json.dumps(text)},'
                           f'"logprobs":{logprobs},"finish_reason":{fin}}}')

    def delta(self, delta: dict[str, Any], index: int = 0, finish: str | None = None) -> bytes:
        """A chat delta of any shape (tool-call deltas: gateway/tools.py)."""
        return self._event(f'{{"index":{index},"delta":{_dumps(delta)},"logprobs":null,'
                           f'"finish_reason":{json.dumps(finish_reason(finish))}}}')

    def usage(self, finals: list[dict[str, Any]], n: int = 1) -> bytes:
        """The usage of every choice (their END fields, in order, n to a prompt)."""
        usage = _dumps(usage_of(finals, n))
        return f'data: {self.head},"choices":[],"usage":{usage}}}\n\n'.encode()

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return f"data: {_dumps(body)}\n\n".encode()
