"""`zeroserve bench isolation`: does one tenant's abuse slow another tenant down?

A broker, one LLM worker (--model, default tiny) and a gateway with two API keys, on a temp dir
and a free loopback port. Tenant B sends short streamed chat requests one after another
(--requests per round) and its TTFT is measured from the request to the first token. Rounds
alternate (--rounds of each): quiet, B alone; loaded, B while tenant A floods the gateway with
--flooders concurrent loops of /tokenize calls of 3 MiB of text (seconds of tokenizer work
each) and 7 MB completion bodies (--flood tokenize or bodies: only one kind, back to back).
Reported (JSON keys):
  ttft_ms_p50_quiet, ttft_ms_p99_quiet     B alone
  ttft_ms_p50_loaded, ttft_ms_p99_loaded   B beside A's flood
  ttft_ms_p50_quiet_rounds, ..._loaded_rounds   each round's p50 (this machine is noisy)
  p99_loaded_over_quiet                    the goal: at most 1.5
  flood_requests                           what A got through meanwhile (any status)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zeroserve.procs import spawn, stop_all
from zeroserve.tooling.bench.drivers import sse_events
from zeroserve.tooling.bench.fleet import fleet
from zeroserve.tooling.bench.stats import percentile, report

KEYS = {"keys": [{"id": "a", "key": "sk-tenant-a"}, {"id": "b", "key": "sk-tenant-b"}]}


async def _tenant_b(url: str, n: int, bar: tqdm) -> list[float]:
    """TTFTs (ms) of n short streamed chats, one after another."""
    import httpx

    ttfts = []
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 headers={"authorization": "Bearer sk-tenant-b"}) as http:
        for i in range(n):
            body = {"model": "bench", "stream": True, "max_tokens": 8, "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"short question {i}"}]}
            t0 = time.perf_counter()
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                async for event in sse_events(resp):
                    if any(c.get("delta", {}).get("content") for c in event["choices"]):
                        ttfts.append((time.perf_counter() - t0) * 1000)
                        break
            bar.update()
    return ttfts


FLOODS = ("both", "tokenize", "bodies")


def _tenant_a(url: str, flooders: int, stop: Any, count: Any, flood: str = "both") -> None:
    """Tenant A, in a process of its own (its client work must not slow B's measurement):
    `flooders` loops of a 3 MiB /tokenize then a 7 MB completion body (or one of the two),
    until `stop` is set."""
    import httpx

    tokenize = json.dumps({"model": "bench", "prompt": "word " * (3 * 2**20 // 5)}).encode()
    big = json.dumps({"model": "bench", "prompt": "x" * 7_000_000, "max_tokens": 1}).encode()
    kinds = [("/tokenize", tokenize), ("/v1/completions", big)]
    kinds = kinds[:1] if flood == "tokenize" else kinds[1:] if flood == "bodies" else kinds

    async def loop(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            for path, body in kinds:
                with contextlib.suppress(httpx.HTTPError):
                    await http.post(path, content=body)
                with count.get_lock():
                    count.value += 1

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120, headers={
                "authorization": "Bearer sk-tenant-a",
                "content-type": "application/json"}) as http:
            await asyncio.gather(*(loop(http) for _ in range(flooders)))

    asyncio.run(run())


def _round(url: str, n: int, flooders: int, bar: tqdm, flood: str = "both"
           ) -> tuple[list[float], int]:
    if not flooders:
        return asyncio.run(_tenant_b(url, n, bar)), 0
    mp = multiprocessing.get_context("spawn")
    stop, count = mp.Event(), mp.Value("i", 0)
    flooder = mp.Process(target=_tenant_a, args=(url, flooders, stop, count, flood),
                         daemon=True)
    flooder.start()
    time.sleep(1.5)  # the flood is under way
    try:
        ttfts = asyncio.run(_tenant_b(url, n, bar))
    finally:
        stop.set()
        flooder.join(120)  # its requests in flight end first: no work left for the next round
        if flooder.is_alive():
            flooder.kill()
    return ttfts, count.value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve bench isolation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="preset or model directory")
    ap.add_argument("--rounds", type=int, default=3, help="quiet and loaded rounds, each")
    ap.add_argument("--requests", type=int, default=40, help="tenant B's requests a round")
    ap.add_argument("--flooders", type=int, default=2, help="tenant A's concurrent loops")
    ap.add_argument("--flood", choices=FLOODS, default="both", help="what tenant A sends: "
                    "3 MiB /tokenize calls and 7 MB bodies in turn, or one of them")
    ap.add_argument("--unpaced", action="store_true", help="the gateway without its body "
                    "pace (--body-mib-per-s 0): what the pace buys")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from zeroserve.models import resolve
    from zeroserve.tooling.bench.serve import _free_port, _wait_http

    flags = ["--engine", "llm", "--model", str(resolve(args.model)), "--served-name", "bench",
             "--max-model-len", "512"]
    ttft: dict[str, list[float]] = {"quiet": [], "loaded": []}
    per_round: dict[str, list[float]] = {"quiet": [], "loaded": []}  # each round's p50
    flood = 0
    with fleet(args.model, 1, [], flags, gateway=False) as (front, _), \
            tempfile.TemporaryDirectory(prefix="zs-isolation-") as tmp:
        keys = Path(tmp, "keys.json")
        keys.write_text(json.dumps(KEYS))
        port = _free_port()
        gateway = spawn("gateway", ["--broker", front, "--port", str(port), "--cache-mb", "0",
                                    "--api-keys-file", str(keys), "--log-level", "WARNING",
                                    *(["--body-mib-per-s", "0"] if args.unpaced else [])])
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_http(f"{url}/ready", gateway)
            bar = tqdm(total=2 * args.rounds * args.requests, desc="tenant B", leave=False)
            asyncio.run(_tenant_b(url, 5, tqdm(disable=True)))  # warm: templates, first steps
            for _ in range(args.rounds):
                for kind in ("quiet", "loaded"):
                    got, n = _round(url, args.requests,
                                    args.flooders if kind == "loaded" else 0, bar, args.flood)
                    ttft[kind] += got
                    per_round[kind].append(round(percentile(got, 50), 1))
                    flood += n
            bar.close()
        finally:
            stop_all([gateway])
    res: dict[str, Any] = {"model": args.model, "rounds": args.rounds,
                           "requests_per_round": args.requests, "flooders": args.flooders,
                           "flood": args.flood, "paced": not args.unpaced,
                           "flood_requests": flood}
    for kind, values in ttft.items():
        res[f"ttft_ms_p50_{kind}"] = percentile(values, 50)
        res[f"ttft_ms_p99_{kind}"] = percentile(values, 99)
        res[f"ttft_ms_p50_{kind}_rounds"] = per_round[kind]
    res["p99_loaded_over_quiet"] = res["ttft_ms_p99_loaded"] / res["ttft_ms_p99_quiet"]
    report(res, args.json, "zeroserve bench isolation (tenant B's TTFT, quiet vs A flooding)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
