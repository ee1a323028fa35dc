"""`zeroserve bench structured`: what does constrained decoding (response_format) cost?

Starts a broker and one LLM worker on ipc paths in a temp dir, then sends the same chat
requests at --concurrency in rounds that alternate: free text, then each request with a JSON
schema to follow (a record of bounded strings, integers, enums and a short array). Prints
output tokens per second of each kind (medians of the rounds), their ratio, and how many
constrained outputs parsed as JSON valid for the schema (the rest stopped at max_tokens).
The goal: constrained at least 0.8x the free-text tok/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from zeroserve.procs import exit_on_sigterm
from zeroserve.tooling.bench.pipeline import llm_pipeline
from zeroserve.tooling.bench.stats import report

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "city": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "city", "age", "role", "active", "tags"],
    "additionalProperties": False,
}


async def one_round(endpoint: str, n: int, concurrency: int, max_tokens: int,
                    constrained: bool) -> tuple[float, int, int]:
    """(output tok/s, outputs valid for the schema, outputs) for n requests."""
    from zeroserve.client import AsyncClient

    gate = asyncio.Semaphore(concurrency)
    tokens, valid = 0, 0
    extra = {"response_format": {"type": "json_schema", "schema": SCHEMA}} if constrained else {}

    async def one(client: AsyncClient, i: int) -> None:
        nonlocal tokens, valid
        async with gate:
            res = await client.generate("bench", messages=[
                {"role": "user", "content": f"Describe person {i} as a JSON record."}],
                max_tokens=max_tokens, temperature=0.8, seed=i, **extra)
        tokens += res.usage.get("completion_tokens", 0)
        if constrained and res.finish_reason == "stop":
            value = json.loads(res.text)
            valid += isinstance(value, dict) and set(value) == set(SCHEMA["required"])

    async with AsyncClient(endpoint) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        elapsed = time.perf_counter() - t0
    return tokens / elapsed, valid, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve bench structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset or model directory")
    ap.add_argument("--requests", type=int, default=64, help="per round")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    exit_on_sigterm()

    from zeroserve.models import resolve

    free: list[float] = []
    constrained: list[float] = []
    valid = total = 0
    with llm_pipeline(resolve(args.model), args.concurrency, "zs-structured-") as front:
        asyncio.run(one_round(front, 4, 4, 8, True))  # warm up, grammar engine included
        for _ in range(args.rounds):
            free.append(asyncio.run(one_round(front, args.requests, args.concurrency,
                                              args.max_tokens, False))[0])
            tok_s, ok, n = asyncio.run(one_round(front, args.requests, args.concurrency,
                                                 args.max_tokens, True))
            constrained.append(tok_s)
            valid, total = valid + ok, total + n
    res = {"concurrency": args.concurrency, "requests_per_round": args.requests,
           "rounds": args.rounds, "free_tok_s": statistics.median(free),
           "constrained_tok_s": statistics.median(constrained),
           "ratio_median_of_rounds": statistics.median(
               c / f for c, f in zip(constrained, free, strict=True)),
           "constrained_valid": valid, "constrained_total": total}
    report(res, args.json, "zeroserve bench structured")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
