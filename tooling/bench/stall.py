"""`zeroserve bench stall`: do running streams stall while a huge prompt is tokenized?

Starts a broker and one LLM worker on ipc paths in a temp dir, then runs the same 16 greedy
streams twice through the SDK: once alone, once with a 200,000-character chat message sent
while they decode (its template and tokenization are the text work; the worker then refuses it
as too long, which is fine: the work is done by then). Prints each round's inter-token latency
p50 and p99, the p99 the big prompt added, and how long the big prompt took to be answered.
The goal: the p99 added stays within one step time (the quiet round's ITL p50).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

from zeroserve.errors import BadRequestError
from zeroserve.procs import exit_on_sigterm
from zeroserve.tooling.bench.pipeline import llm_pipeline
from zeroserve.tooling.bench.stats import percentile, report


async def one_round(endpoint: str, streams: int, max_tokens: int, big_chars: int
                    ) -> dict[str, float]:
    from zeroserve.client import AsyncClient

    gaps: list[float] = []
    started = asyncio.Event()

    async def stream(client: AsyncClient, i: int) -> None:
        last = None
        async for chunk in client.stream("bench", f"stream number {i} says", temperature=0,
                                         max_tokens=max_tokens, ignore_eos=True):
            now = time.perf_counter()
            if chunk.token_ids:
                if last is not None:
                    gaps.append(now - last)
                last = now
                if len(gaps) >= streams * 8:
                    started.set()
        # a stream that ended before that (its tokens came in fewer, larger chunks) lets the
        # big prompt go too: it must never wait for gaps that will not come
        started.set()

    async def big(client: AsyncClient) -> float:
        await started.wait()
        t0 = time.perf_counter()
        message = ("lorem ipsum dolor sit amet " * (big_chars // 27 + 1))[:big_chars]
        with contextlib.suppress(BadRequestError):  # too long once tokenized: expected
            await client.generate("bench", messages=[{"role": "user", "content": message}],
                                  max_tokens=1)
        return (time.perf_counter() - t0) * 1000

    async with AsyncClient(endpoint) as client:
        await client.generate("bench", "warm up", max_tokens=2)
        tasks = [asyncio.create_task(stream(client, i)) for i in range(streams)]
        big_ms = await big(client) if big_chars else 0.0
        started.set()
        await asyncio.gather(*tasks)
    if not gaps:  # every stream's tokens came in one chunk: a stall as long as the round
        raise SystemExit("zeroserve bench stall: a round measured no gap between tokens (each "
                         "stream's reply came in one piece): give it more --max-tokens")
    return {"itl_ms_p50": percentile(gaps, 50) * 1000, "itl_ms_p99": percentile(gaps, 99) * 1000,
            "big_prompt_answered_ms": big_ms}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve bench stall", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset or model directory")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--big-chars", type=int, default=200_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    exit_on_sigterm()  # a benchmark killed by `timeout` still stops its pipeline

    from zeroserve.models import resolve

    with llm_pipeline(resolve(args.model), args.streams + 2, "zs-stall-") as front:
        quiet = asyncio.run(one_round(front, args.streams, args.max_tokens, 0))
        loaded = asyncio.run(one_round(front, args.streams, args.max_tokens, args.big_chars))
    res = {"streams": args.streams, "big_chars": args.big_chars,
           "quiet_itl_ms_p50": quiet["itl_ms_p50"], "quiet_itl_ms_p99": quiet["itl_ms_p99"],
           "big_itl_ms_p50": loaded["itl_ms_p50"], "big_itl_ms_p99": loaded["itl_ms_p99"],
           "big_prompt_answered_ms": loaded["big_prompt_answered_ms"],
           "itl_p99_added_ms": loaded["itl_ms_p99"] - quiet["itl_ms_p99"]}
    res["itl_p99_added_in_steps"] = res["itl_p99_added_ms"] / quiet["itl_ms_p50"]
    report(res, args.json, "zeroserve bench stall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
