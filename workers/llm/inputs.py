"""The LLM engine's input processing: prompts, chat templates and the text ops, on strings.

`Inputs` turns a request body's input (prompt, prompt_token_ids, or messages with tools through
the chat template) into token ids, bounded (MAX_PROMPT_CHARS before any tokenizer work), and
answers the text ops without generating: {"op": "tokenize", prompt | messages} -> {tokens,
count, max_model_len} (at most MAX_TOKENIZE_TOKENS ids) and {"op": "detokenize", "tokens":
[id]} -> {prompt} (vLLM's shapes). It runs on the worker's prepare threads (engine.prepare),
touching no engine state.

Text is encoded by the tokenizer's Rust backend (`encode_batch_fast`), which lets go of the
GIL while it works: transformers' own `encode` then builds a Python object per token with the
GIL held, and a 3 MiB prompt stalled the engine and IO threads 100-130 ms (14 ms this way, in
half the time). The backend is used only if it gives transformers' ids on a probe text (and
chat); else transformers encodes.
"""

from __future__ import annotations

import json
from typing import Any

from zeroserve import protocol as p
from zeroserve.config import MAX_PROMPT_CHARS, MAX_TOKENIZE_TOKENS
from zeroserve.workers.engine import EngineError

PROBE = "Hello, world! 123\n\t  don't  <s></s><|im_end|> ünïcode 日本語 \u00a0x"
PROBE_CHAT = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": PROBE}, {"role": "assistant", "content": "ok"}]


class Inputs:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.fast: Any = None  # the Rust tokenizer, once it agrees with transformers
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if hasattr(backend, "encode_batch_fast"):
            self.fast = backend if self._agrees(backend) else None

    def _agrees(self, backend: Any) -> bool:
        """Whether the backend gives transformers' ids for a probe text, and for a chat."""
        try:
            tok = self.tokenizer
            fast = [backend.encode_batch_fast([PROBE], add_special_tokens=special)[0].ids
                    for special in (True, False)]
            if fast != [tok.encode(PROBE), tok.encode(PROBE, add_special_tokens=False)]:
                return False
            if getattr(tok, "chat_template", None):
                out = tok.apply_chat_template(PROBE_CHAT, tokenize=True)
                ids = out["input_ids"] if hasattr(out, "keys") else out
                text = tok.apply_chat_template(PROBE_CHAT, tokenize=False)
                return list(ids) == backend.encode_batch_fast(
                    [text], add_special_tokens=False)[0].ids
            return True
        except Exception:  # noqa: BLE001 - any doubt: transformers encodes
            return False

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text` (with the tokenizer's special tokens, e.g. BOS, if `special`)."""
        if self.fast is not None:
            return self.fast.encode_batch_fast([text], add_special_tokens=special)[0].ids
        return self.tokenizer.encode(text, add_special_tokens=special)

    def text_op(self, body: dict[str, Any]) -> dict[str, Any]:
        """{"op": "tokenize", prompt | messages (+ add_generation_prompt)} -> {tokens, count,
        max_model_len}; {"op": "detokenize", "tokens": [id]} -> {prompt} (vLLM's shapes)."""
        op = body["op"]
        if op == "tokenize":
            ids = self.prompt_ids(body)
            if len(ids) > MAX_TOKENIZE_TOKENS:
                raise EngineError(p.BAD_REQUEST, f"the text is {len(ids)} tokens; /tokenize "
                                                 f"answers at most {MAX_TOKENIZE_TOKENS}")
            return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len,
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": 0}}
        if op == "detokenize":
            ids = body.get("tokens")
            vocab = self.vocab_size
            if not isinstance(ids, list) or len(ids) > 1 << 20 or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                    for t in ids):
                raise EngineError(p.BAD_REQUEST, f"tokens must be a list of token ids below "
                                                 f"{vocab}")
            return {"prompt": self.tokenizer.decode(ids), "usage": {
                "prompt_tokens": len(ids), "completion_tokens": 0}}
        raise EngineError(p.BAD_REQUEST, f"unknown op {str(op)[:40]!r}: tokenize or detokenize")

    def prompt_ids(self, body: dict[str, Any]) -> list[int]:
        if "prompt_token_ids" in body:
            ids = body["prompt_token_ids"]
            vocab = self.vocab_size
            if not isinstance(ids, list) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids
            ):
                raise EngineError(p.BAD_REQUEST, "prompt_token_ids must be a non-empty list of "
                                                 f"token ids below {vocab}")
            return ids
        if "messages" in body:
            return self.chat_ids(body["messages"], body.get("add_generation_prompt") is not False,
                                  body.get("tools"))
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt or len(prompt) > MAX_PROMPT_CHARS:
            raise EngineError(p.BAD_REQUEST, "prompt must be a non-empty string "
                                             "(or give prompt_token_ids or messages)")
        return self.encode(prompt)

    def chat_ids(self, messages: Any, add_generation_prompt: bool = True,
                  tools: Any = None) -> list[int]:
        """Messages ({role, content, tool_calls?, tool_call_id?}) and the tools to show, through
        the chat template."""
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            and isinstance(m.get("tool_calls", []), list)
            and isinstance(m.get("tool_call_id", ""), str) for m in messages
        ):
            raise EngineError(p.BAD_REQUEST, "messages must be a list of {role, content} strings")
        if tools is not None and not (isinstance(tools, list) and len(tools) <= 64
                                      and all(isinstance(t, dict) for t in tools)):
            raise EngineError(p.BAD_REQUEST, "tools must be a list of at most 64 objects")
        extra = [m for m in messages if "tool_calls" in m or "tool_call_id" in m]
        chars = sum(len(m["content"]) for m in messages) + (
            len(json.dumps([tools, [m.get("tool_calls") for m in extra]])) if tools or extra
            else 0)
        if chars > MAX_PROMPT_CHARS:  # before the template and the tokenizer spend time on it
            raise EngineError(p.BAD_REQUEST, f"messages hold {chars} characters; the limit is "
                                             f"{MAX_PROMPT_CHARS}")
        keep = ("role", "content", "tool_calls", "tool_call_id")
        try:
            out = self.tokenizer.apply_chat_template(
                [{k: m[k] for k in keep if k in m} for m in messages], tools=tools or None,
                add_generation_prompt=add_generation_prompt, tokenize=self.fast is None)
        except Exception as exc:
            raise EngineError(p.BAD_REQUEST, f"chat template failed: {exc}") from None
        if isinstance(out, str):  # rendered: the template wrote the special tokens
            return self.encode(out, special=False)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
