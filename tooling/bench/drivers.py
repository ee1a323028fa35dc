"""Load generators for `zeroserve bench serve`: its workloads (make_workload: the kinds are
in serve.py's docstring), driven through the SDK or over HTTP.

Each driver fires a workload of (prompt text, token ids, output length[, class]) at a fixed
concurrency or at Poisson arrivals, and records per request: time to first token, inter-token
gaps, end to end time, tokens, and its class (CLASSES: the mixed workload's interactive and
batch requests, each sent with its priority). Connects only to the endpoint or URL it is given.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from zeroserve.tooling.bench.stats import percentile

CLASSES = {"": {}, "interactive": {"priority": 0}, "batch": {"priority": 10}}


def make_workload(n: int, tokenizer: Any, seed: int = 0,
                  kind: str = "default") -> list[tuple[str, list[int], int]]:
    """(prompt text, its token ids, output length) per request, from a fixed seed, of tokens
    that survive a decode/encode round trip (see the module docstring for the kinds)."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [t for t in range(len(tokenizer)) if t not in special
             and tokenizer.encode(tokenizer.decode([t])) == [t]]

    def text_of(target: int) -> str:
        text = tokenizer.decode([rng.choice(vocab) for _ in range(target)])
        return tokenizer.decode(tokenizer.encode(text)[:target])

    out = []
    if kind == "mixed":
        for _ in range(n):
            if rng.random() < 0.75:
                text = text_of(rng.randint(16, 48))
                out.append((text, tokenizer.encode(text), rng.randint(16, 32), "interactive"))
            else:
                text = text_of(rng.randint(256, 384))
                out.append((text, tokenizer.encode(text), rng.randint(128, 192), "batch"))
        return out
    if kind == "long":
        return [(text, tokenizer.encode(text), 64) for text in (text_of(4096) for _ in range(n))]
    if kind == "shared-prefix":
        systems = [text_of(1000) + "\n\n" for _ in range(4)]
        for _ in range(n):
            text = rng.choice(systems) + text_of(rng.randint(32, 128))
            out.append((text, tokenizer.encode(text), 64))
        return out
    for _ in range(n):
        text = text_of(rng.randint(32, 256))
        out.append((text, tokenizer.encode(text), rng.randint(64, 128)))
    return out


@dataclass
class Record:
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    itls_s: list[float] = field(default_factory=list)
    error: str = ""
    kind: str = ""  # its class in a mixed workload

    def meets(self, ttft_ms: float, tpot_ms: float) -> bool:
        """Did it meet both SLOs (DistServe's goodput counts those that do)?"""
        tpot = (self.e2e_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else 0.0
        return not self.error and self.ttft_s * 1000 <= ttft_ms and tpot * 1000 <= tpot_ms


async def drive_sdk(endpoint: str, model: str, workload: list, concurrency: int,
                    rate: float | None) -> tuple[list[Record], float]:
    from zeroserve.client import AsyncClient

    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(workload), desc="via sdk", leave=False)

    async def one(client: AsyncClient, text: str, n: int, kind: str = "") -> Record:
        rec = Record(kind=kind)
        async with sem:
            t0 = last = time.perf_counter()
            try:
                async for chunk in client.stream(model, text, max_tokens=n, temperature=0,
                                                 **CLASSES[kind]):
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if rec.tokens == 0:
                            rec.ttft_s = now - t0
                        else:
                            rec.itls_s.append(now - last)
                        rec.tokens += len(chunk.token_ids)
                        last = now
            except Exception as exc:
                rec.error = repr(exc)
            rec.e2e_s = time.perf_counter() - t0
        bar.update()
        return rec

    async with AsyncClient(endpoint) as client:
        await client.generate(model, workload[0][0][:32], max_tokens=2)
        out = await _fire(workload, rate, lambda *item: one(client, *item))
    bar.close()
    return out


async def drive_http(base_url: str, model: str, workload: list, concurrency: int,
                     rate: float | None, label: str) -> tuple[list[Record], float]:
    """The same requests as OpenAI streaming completions over HTTP (SSE)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(workload), desc=f"via {label}", leave=False)

    async def one(client: httpx.AsyncClient, text: str, n: int, kind: str = "") -> Record:
        rec = Record(kind=kind)
        body = {"model": model, "prompt": text, "max_tokens": n, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, **CLASSES[kind]}
        async with sem:
            t0 = last = time.perf_counter()
            events = 0
            try:
                async with client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
                    async for event in sse_events(r):
                        now = time.perf_counter()
                        if event.get("usage"):
                            rec.tokens = event["usage"]["completion_tokens"]
                        choices = event.get("choices") or []
                        if choices and choices[0].get("text"):
                            if events == 0:
                                rec.ttft_s = now - t0
                            else:
                                rec.itls_s.append(now - last)
                            events += 1
                            last = now
                rec.tokens = rec.tokens or events
            except Exception as exc:
                rec.error = repr(exc)
            rec.e2e_s = time.perf_counter() - t0
        bar.update()
        return rec

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one(client, workload[0][0][:32], 2)  # warm the connection pool and the path
        out = await _fire(workload, rate, lambda *item: one(client, *item))
    bar.close()
    return out


async def sse_events(response: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream (httpx), up to its [DONE]."""
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def _fire(workload: list, rate: float | None, one: Any) -> tuple[list[Record], float]:
    """Start every request (all at once, or at Poisson arrivals of `rate` per second) and
    wait for all; the concurrency limit lives inside `one`."""
    rng = random.Random(1)
    t0 = time.perf_counter()
    tasks = []
    for text, _, n, *kind in workload:
        tasks.append(asyncio.create_task(one(text, n, *kind)))
        if rate:
            await asyncio.sleep(rng.expovariate(rate))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - t0


def summarize(records: list[Record], elapsed: float,
              goodput: tuple[float, float] | None = None) -> dict[str, float]:
    """Throughput and latency of a run; with `goodput` (TTFT ms, TPOT ms), the requests per
    second that met both, overall and per class of a mixed workload (with each class's
    tokens per second)."""
    extra: dict[str, float] = {}
    if goodput is not None:
        extra["goodput_rps"] = sum(r.meets(*goodput) for r in records) / elapsed
        for kind in {r.kind for r in records} - {""}:
            mine = [r for r in records if r.kind == kind]
            extra[f"{kind}_goodput_rps"] = sum(r.meets(*goodput) for r in mine) / elapsed
            extra[f"{kind}_tok_s"] = sum(r.tokens for r in mine if not r.error) / elapsed
            extra[f"{kind}_ttft_ms_p99"] = percentile(
                [r.ttft_s for r in mine if not r.error], 99) * 1000
            extra[f"{kind}_tpot_ms_p50"] = percentile(
                [(r.e2e_s - r.ttft_s) / (r.tokens - 1) for r in mine
                 if not r.error and r.tokens > 1], 50) * 1000
    ok = [r for r in records if not r.error]
    tokens = sum(r.tokens for r in ok)
    tpots = [(r.e2e_s - r.ttft_s) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itls = [x for r in ok for x in r.itls_s]
    return {
        "requests_ok": len(ok),
        "requests_failed": len(records) - len(ok),
        "request_throughput_per_s": len(ok) / elapsed,
        "completion_tokens": tokens,
        "served_tok_s": tokens / elapsed,
        "ttft_ms_p50": percentile([r.ttft_s for r in ok], 50) * 1000,
        "ttft_ms_p99": percentile([r.ttft_s for r in ok], 99) * 1000,
        "tpot_ms_p50": percentile(tpots, 50) * 1000,
        "tpot_ms_p99": percentile(tpots, 99) * 1000,
        "itl_ms_p99": percentile(itls, 99) * 1000,
        **extra,
    }


async def idle_ttft(endpoint: str, base_url: str, workload: list,
                    n: int = 30) -> dict[str, float]:
    """What the gateway alone adds: one request at a time on an idle pipeline, the same short
    prompts through the SDK and over HTTP, alternating; TTFT p50 of each. The HTTP side uses a
    bare HTTP/1.1 client on one kept-alive connection, so client overhead stays out of it."""
    from zeroserve.client import AsyncClient

    host, port = base_url.rsplit("/", 1)[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    sdk, http = [], []
    try:
        async with AsyncClient(endpoint) as client:
            for i, (text, _, _) in enumerate([workload[0], *workload[:n]]):
                prompt = text[:64]
                t0 = time.perf_counter()
                first = None
                async for chunk in client.stream("bench", prompt, max_tokens=4, temperature=0):
                    if first is None and chunk.token_ids:
                        first = time.perf_counter() - t0
                body = {"model": "bench", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                        "stream": True}
                http_first = await _raw_sse_ttft(reader, writer, body)
                if i:  # the first round warms both paths
                    sdk.append((first or 0.0) * 1000)
                    http.append(http_first * 1000)
    finally:
        writer.close()
    return {"sdk_idle_ttft_ms_p50": percentile(sdk, 50),
            "http_idle_ttft_ms_p50": percentile(http, 50)}


async def _raw_sse_ttft(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        body: dict[str, Any]) -> float:
    """POST a streaming completion; seconds until the first content event arrives."""
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(data)).encode() + b"\r\n\r\n" + data)
    t0 = time.perf_counter()
    buf, first = b"", 0.0
    while not buf.endswith(b"0\r\n\r\n"):  # the end of a chunked body
        part = await reader.read(65536)
        if not part:
            raise ConnectionError("the gateway closed the connection")
        buf += part
        if not first and b'"text":"' in buf and b'"text":""' not in buf.split(b"data: ")[-1]:
            first = time.perf_counter() - t0
    return first or time.perf_counter() - t0
