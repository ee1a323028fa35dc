"""Tool calling: what a chat request's `tools` and `tool_choice` ask of the engine, and how
the text it generates becomes OpenAI's `tool_calls` (whole, or as streamed deltas).

  tool_choice "none"          tools are not shown to the model; plain text comes back
  "auto" (the default)        tools are rendered by the chat template; the reply is parsed
                              for <tool_call>{"name": ..., "arguments": {...}}</tool_call>
                              blocks (the Hermes / Qwen 2.5+ format, which many templates
                              use); text outside them stays content
  "required", or a function   decoding is constrained (workers/llm/grammar.py) to one call,
                              {"name": <one of the tools>, "arguments": <its parameters'
                              schema>}, generated compact: the arguments always parse
A call's id is call_<request id>_<n>. Pure functions and one small class, no IO.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
FORCED_HEAD_RE = re.compile(r'^\{"name":("(?:[^"\\]|\\.)*"),"arguments":')


def forced_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of exactly one call to one of `functions` ({name, parameters})."""
    calls = [{"type": "object", "properties": {
        "name": {"const": f["name"]},
        "arguments": f.get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False}
        for f in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _call(rid: str, n: int, name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                  separators=(",", ":"))
    return {"id": f"call_{rid}_{n}", "type": "function",
            "function": {"name": name, "arguments": args}}


def parse(text: str, forced: bool, rid: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a whole reply. A forced reply that does not parse (cut by
    max_tokens) stays content."""
    if forced:
        try:
            call = json.loads(text)
            return None, [_call(rid, 0, call["name"], call["arguments"])]
        except (ValueError, KeyError, TypeError):
            return text, []
    calls, content = [], text
    for m in BLOCK_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
            calls.append(_call(rid, len(calls), str(obj["name"]), obj.get("arguments", {})))
            content = content.replace(m.group(0), "", 1)
        except (ValueError, KeyError, TypeError):
            continue
    return (content.strip() or None, calls) if calls else (text, [])


@dataclass
class ToolStream:
    """One streamed choice's text turned into chat deltas: content, or tool-call deltas."""

    forced: bool
    rid: str
    buffer: str = ""
    started: bool = False  # forced: the call's name has been sent
    held: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[dict[str, Any]]:
        self.buffer += text
        if self.forced:
            return self._forced()
        if OPEN in self.buffer or self.held:  # a call has begun: hold everything to the end
            self.held.append(self.buffer)
            self.buffer = ""
            return []
        keep = _partial_open(self.buffer)  # the end may start "<tool_call>"
        out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(
            self.buffer) - keep:]
        return [{"content": out}] if out else []

    def _forced(self) -> list[dict[str, Any]]:
        if not self.started:
            m = FORCED_HEAD_RE.match(self.buffer)
            if m is None:
                return []
            self.started = True
            self.buffer = self.buffer[m.end():]
            head = {"tool_calls": [{"index": 0, **_call(self.rid, 0, json.loads(m.group(1)),
                                                        "")}]}
            return [head, *self._forced()]
        out, self.buffer = self.buffer[:-1], self.buffer[-1:]  # the last "}" closes the call
        return [{"tool_calls": [{"index": 0, "function": {"arguments": out}}]}] if out else []

    def finish(self, reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The deltas left at the end, and the finish reason to send."""
        if self.forced:
            if self.started and reason == "stop" and self.buffer == "}":
                return [], "tool_calls"
            rest = self.buffer  # cut short: what there is goes as arguments text
            return ([{"tool_calls": [{"index": 0, "function": {"arguments": rest}}]}]
                    if self.started and rest else [{"content": rest}] if rest else []), reason
        text = "".join(self.held) + self.buffer
        content, calls = parse(text, False, self.rid)
        if not calls:
            return ([{"content": text}] if text else []), reason
        deltas: list[dict[str, Any]] = [{"content": content}] if content else []
        deltas += [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(calls)]
        return deltas, "tool_calls"


def _partial_open(text: str) -> int:
    """Length of the longest end of `text` that begins OPEN."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-k:]):
            return k
    return 0
