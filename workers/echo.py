"""The echo engine: streams a prompt's whitespace tokens back, one per step.

The test and benchmark engine for the transport. All running requests advance together, one
token per step, and each step sleeps `step_delay_ms` to stand in for compute.

Request body: {"prompt": str, "max_tokens": int (optional), "fail_at": int (optional),
"resume": {"token_ids": [...]} (optional: go on after that many tokens, see llm/engine.py)}.
`fail_at` makes the step that would emit that token raise, so tests can watch the runtime
fail the batch with INTERNAL and carry on; `stall_at` makes that step hang for an hour (a hung
engine, for the progress timeout).
Each step's delta: {"text": str, "token_ids": [index]}; END adds finish_reason and usage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from zeroserve import protocol as p
from zeroserve.workers.engine import EngineError, Output, RequestKey

MAX_PROMPT_TOKENS = 1_000_000


@dataclass(slots=True)
class _Echo:
    tokens: list[str]
    pos: int = 0
    fail_at: int = -1
    stall_at: int = -1


class EchoEngine:
    def __init__(self, model: str = "echo", capacity: int = 64, step_delay_ms: float = 0.0,
                 device: str = "cpu") -> None:
        self.models = (model,)
        self.capacity = capacity
        self.device = device
        self.step_delay_s = step_delay_ms / 1000
        self.running: dict[RequestKey, _Echo] = {}
        self.steps = 0

    def add(self, key: RequestKey, body: dict[str, Any], buffers: list[bytes]) -> None:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise EngineError(p.BAD_REQUEST, "prompt must be a string")
        tokens = prompt.split() or [""]
        max_tokens = body.get("max_tokens", len(tokens))
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise EngineError(p.BAD_REQUEST, "max_tokens must be a positive integer")
        fail_at, stall_at = body.get("fail_at", -1), body.get("stall_at", -1)
        if not isinstance(fail_at, int) or not isinstance(stall_at, int):
            raise EngineError(p.BAD_REQUEST, "fail_at and stall_at must be integers")
        resume = body.get("resume")
        done = resume.get("token_ids") if isinstance(resume, dict) else []
        if not isinstance(done, list) or len(done) >= min(max_tokens, len(tokens)):
            raise EngineError(p.BAD_REQUEST, "resume.token_ids must be shorter than the reply")
        self.running[key] = _Echo(tokens[: min(max_tokens, MAX_PROMPT_TOKENS)], len(done),
                                  fail_at, stall_at)

    def cancel(self, key: RequestKey) -> list[Output]:
        req = self.running.pop(key, None)
        if req is None:
            return []
        return [Output(key, finish={"finish_reason": "cancelled", "usage": _usage(req)})]

    def abort_all(self, code: str, message: str) -> list[Output]:
        outs = [Output(key, error=(code, message)) for key in self.running]
        self.running.clear()
        return outs

    def has_work(self) -> bool:
        return bool(self.running)

    def step(self) -> list[Output]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.steps += 1
        outs: list[Output] = []
        done: list[RequestKey] = []
        for key, req in self.running.items():
            if req.pos == req.fail_at:
                raise RuntimeError(f"echo asked to fail at token {req.pos}")
            if req.pos == req.stall_at:
                time.sleep(3600)
            word = req.tokens[req.pos]
            delta = {"text": word if req.pos == 0 else " " + word, "token_ids": [req.pos]}
            req.pos += 1
            if req.pos >= len(req.tokens):
                done.append(key)
                outs.append(Output(key, delta, {"finish_reason": "length", "usage": _usage(req)}))
            else:
                outs.append(Output(key, delta))
        for key in done:
            del self.running[key]
        return outs

    def warmup(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.running), "waiting": 0, "steps": self.steps}

    def close(self) -> None:
        self.running.clear()


def _usage(req: _Echo) -> dict[str, int]:
    return {"prompt_tokens": len(req.tokens), "completion_tokens": req.pos}
