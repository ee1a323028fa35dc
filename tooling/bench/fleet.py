"""`zeroserve bench fleet`: several workers behind one broker, and what routing does for them.

--workload multi-turn (LLM workers, through the gateway over HTTP): --conversations chats
(24) of --turns turns (4), --concurrency at a time (8), greedy, each opening with a document
of its own (~150 words: the history only one worker can hold), each turn resending the whole
conversation plus a new question, as chat clients do. Run with the broker's --routing (prefix),
then, in the same run, with each --compare routing=... and on one worker. For turns 2+:
  cached_share     prompt tokens served from a prefix cache / prompt tokens (usage's
                   cached_tokens)
  ttft_ms_p50      time to first token
  served_tok_s     output tokens per second over the whole run
  busy_ratio       the busiest worker's engine busy time over the idlest's
Keys of a compared run carry its suffix (`cached_share_least_loaded`), the one-worker run
`_1w`; with --brokers 2, the run through one broker `_1_broker`.

--workload streams (--engine echo: the broker is the bottleneck, not the model): --streams
concurrent streams (512) of --tokens tokens (200) through --workers workers, driven through
the SDK; once with each worker sending a step's deltas for a client as one CHUNKS message,
once with --no-coalesce (one CHUNK per token), in the same run:
  broker_us_per_token   the broker process's CPU time / tokens delivered
  tokens_per_s          tokens delivered per second
(the uncoalesced run's keys end in `_uncoalesced`). With --brokers 2, the same load also
runs through one broker (keys ending in `_1_broker`), broker CPU summed over the brokers.
Everything runs on ipc paths in a temp dir and on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from zeroserve.procs import spawn, stop_all
from zeroserve.tooling.bench.drivers import sse_events
from zeroserve.tooling.bench.stats import percentile, report

WORDS = [
    "river", "stone", "lamp", "window", "garden", "pepper", "violin", "cotton", "harbor",
    "ladder", "meadow", "copper", "falcon", "marble", "lantern", "orchard", "velvet", "thunder",
    "candle", "saddle", "compass", "anchor", "willow", "ember", "glacier", "prairie", "tunnel",
    "quarry", "beacon",
]


def conversations(n: int, turns: int, seed: int = 0) -> list[list[str]]:
    """Each conversation: its opening message (a document and a question), then questions."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        doc = " ".join(rng.choice(WORDS) for _ in range(150))
        out.append([f"Document {i}: {doc}\nWhat is it about?"]
                   + [f"Question {t}: tell me more about {rng.choice(WORDS)}."
                      for t in range(1, turns)])
    return out


@contextlib.contextmanager
def fleet(model: str, workers: int, broker_flags: list[str], worker_flags: list[str],
          gateway: bool = True, brokers: int = 1) -> Iterator[tuple[str, str]]:
    """`brokers` brokers, `workers` workers (every one registered with each broker) and a
    gateway on a temp dir; yields (the frontends, comma-separated; the gateway's url)."""
    from zeroserve.tooling.bench.serve import _free_port, _wait_http
    from zeroserve.tooling.up import wait_ready

    with tempfile.TemporaryDirectory(prefix="zs-fleet-") as tmp:
        fronts = [f"ipc://{tmp}/f{i}" for i in range(brokers)]
        backs = [f"ipc://{tmp}/b{i}" for i in range(brokers)]
        front, back = ",".join(fronts), ",".join(backs)
        quiet = ["--log-level", "WARNING"]
        procs = [spawn("broker", ["--frontend", f, "--backend", b, "--admin", f"{b}-admin",
                                  "--max-queue-wait-ms", "3600000", *broker_flags, *quiet])
                 for f, b in zip(fronts, backs, strict=True)]
        procs += [spawn("worker", ["--broker", back, "--worker-id", f"w{i}", "--slot", str(i),
                                   "--slots", str(workers), *worker_flags, *quiet])
                  for i in range(workers)]
        port = _free_port()
        if gateway:
            procs.append(spawn("gateway", ["--broker", front, "--port", str(port),
                                           "--cache-mb", "0", *quiet]))
        try:
            if not wait_ready(front, workers, 600, procs):
                raise RuntimeError("the fleet did not come up")
            url = f"http://127.0.0.1:{port}"
            if gateway:
                _wait_http(f"{url}/ready")
            yield front, url
        finally:
            stop_all(procs)


async def _chat(url: str, convs: list[list[str]], concurrency: int, max_tokens: int
                ) -> tuple[list[dict[str, Any]], float]:
    """Every conversation, turn by turn; one record per turn (turn, ttft, tokens, usage)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=sum(map(len, convs)), desc="turns", leave=False)
    records: list[dict[str, Any]] = []

    async def one(http: httpx.AsyncClient, questions: list[str]) -> None:
        messages: list[dict[str, str]] = []
        async with sem:
            for turn, question in enumerate(questions):
                messages.append({"role": "user", "content": question})
                body = {"model": "bench", "messages": messages, "max_tokens": max_tokens,
                        "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                t0, ttft, text, usage = time.perf_counter(), None, "", {}
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
                    async for event in sse_events(r):
                        usage = event.get("usage") or usage
                        for choice in event.get("choices") or []:
                            delta = choice.get("delta", {}).get("content")
                            if delta:
                                ttft = ttft or time.perf_counter() - t0
                                text += delta
                messages.append({"role": "assistant", "content": text})
                records.append({"turn": turn, "ttft_s": ttft or 0.0, "usage": usage})
                bar.update()

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(one(http, c) for c in convs))
    bar.close()
    return records, time.perf_counter() - t0


def _busy_ratio(front: str) -> float:
    from zeroserve.client import Client

    time.sleep(1.5)  # one more heartbeat: the final counters
    with Client(front) as client:
        busy = [(w.get("stats") or {}).get("busy_s", 0.0) for w in client.workers()]
    return max(busy) / min(busy) if busy and min(busy) > 0 else float("inf")


def multi_turn(args: argparse.Namespace, routing: str, workers: int, brokers: int = 1
               ) -> dict[str, float]:
    # pinned to their slices of the cores, as deployed: unpinned, three workers' OpenMP
    # threads spin against each other on two cores and a run takes 10-30x as long
    flags = ["--engine", "llm", "--model", args.model, "--served-name", "bench",
             "--dtype", args.dtype]
    convs = conversations(args.conversations, args.turns)
    with fleet(args.model, workers, ["--routing", routing], flags,
               brokers=brokers) as (front, url):
        records, elapsed = asyncio.run(_chat(url, convs, args.concurrency, args.max_tokens))
        ratio = _busy_ratio(front) if workers > 1 else 1.0
    later = [r for r in records if r["turn"] > 0]
    prompt = sum(r["usage"].get("prompt_tokens", 0) for r in later)
    cached = sum((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                 for r in later)
    tokens = sum(r["usage"].get("completion_tokens", 0) for r in records)
    return {"cached_share": cached / prompt if prompt else 0.0,
            "ttft_ms_p50": percentile([r["ttft_s"] for r in later], 50) * 1000,
            "served_tok_s": tokens / elapsed, "busy_ratio": ratio}


async def _streams(front: str, streams: int, tokens: int) -> int:
    from zeroserve.client import AsyncClient

    prompt = " ".join(f"t{i}" for i in range(tokens))
    async with AsyncClient(front) as client:
        async def one() -> int:
            n = 0
            async for chunk in client.stream("echo", prompt):
                n += len(chunk.token_ids)
            return n

        return sum(await asyncio.gather(*(one() for _ in range(streams))))


def broker_bound(args: argparse.Namespace, coalesce: bool, brokers: int
                 ) -> dict[str, float]:
    import psutil

    flags = ["--engine", "echo", "--no-pin", "--capacity", str(args.streams)]
    with fleet("echo", args.workers, [], flags + ([] if coalesce else ["--no-coalesce"]),
               gateway=False, brokers=brokers) as (front, _):
        asyncio.run(_streams(front, 8, 8))  # connections up, paths warm
        procs = [c for c in psutil.Process().children() if "broker" in " ".join(c.cmdline())]

        def cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in procs)

        cpu0, t0 = cpu(), time.perf_counter()
        delivered = asyncio.run(_streams(front, args.streams, args.tokens))
        elapsed, used = time.perf_counter() - t0, cpu() - cpu0
    return {"tokens": delivered, "tokens_per_s": delivered / elapsed,
            "broker_us_per_token": used / delivered * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve bench fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="multi-turn", choices=["multi-turn", "streams"])
    ap.add_argument("--streams", type=int, default=512)
    ap.add_argument("--brokers", type=int, default=1, help="brokers, all active (2: compared "
                    "with 1 in the same run)")
    ap.add_argument("--no-uncoalesced", action="store_true",
                    help="streams: skip the one-message-per-token run")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--model", default="tiny", help="preset or model directory")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--routing", default="prefix", choices=["prefix", "least-loaded"])
    ap.add_argument("--compare", action="append", default=[], metavar="routing=R",
                    help="run again with this routing, in the same run (repeatable)")
    ap.add_argument("--no-single", action="store_true", help="skip the one-worker run")
    ap.add_argument("--conversations", type=int, default=24)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.workload == "streams":
        res = {"workers": args.workers, "brokers": args.brokers, "streams": args.streams,
               **broker_bound(args, True, args.brokers)}
        if args.brokers > 1:  # the same load through one broker, in the same run
            res.update({f"{k}_1_broker": v for k, v in broker_bound(args, True, 1).items()})
        if not args.no_uncoalesced:
            res.update({f"{k}_uncoalesced": v
                        for k, v in broker_bound(args, False, args.brokers).items()})
        report(res, args.json, f"zeroserve bench fleet (streams, {args.workers} echo workers)")
        return 0
    from zeroserve.models import PRESETS, ensure_built

    if args.model in PRESETS:
        args.model = str(ensure_built(args.model))
    res: dict[str, Any] = {"workers": args.workers, "brokers": args.brokers,
                           "routing": args.routing,
                           **multi_turn(args, args.routing, args.workers, args.brokers)}
    if args.brokers > 1:
        res.update({k + "_1_broker": v
                    for k, v in multi_turn(args, args.routing, args.workers).items()})
    for spec in args.compare:
        routing = spec.removeprefix("routing=")
        suffix = "_" + routing.replace("-", "_")
        res.update({k + suffix: v for k, v in multi_turn(args, routing, args.workers).items()})
    if not args.no_single:
        res.update({k + "_1w": v for k, v in multi_turn(args, args.routing, 1).items()
                    if k != "busy_ratio"})
    report(res, args.json, f"zeroserve bench fleet ({args.workload}, {args.workers} workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
