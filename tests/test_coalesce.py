"""One message per engine step per client: a worker sends a step's deltas for one client's
requests as one CHUNKS message (workers/runtime.py), the broker forwards it whole and the SDK
splits it, in order (client_core.py)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import zmq

from zeroserve import protocol as p

from .conftest import start_gateway, wait_for


def _raw_run(pipeline, ctx, n: int) -> tuple[dict[str, str], list[bytes]]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pipeline.frontend)
    for i in range(n):
        sock.send_multipart(p.request(f"r{i}", "echo", {"prompt": " ".join([f"w{i}"] * 20)}))
    texts = {f"r{i}": "" for i in range(n)}
    types, ended = [], 0
    deadline = time.monotonic() + 20
    while ended < n and time.monotonic() < deadline:
        if not sock.poll(200):
            continue
        msg = p.decode(sock.recv_multipart())
        types.append(msg.type)
        if msg.type == p.CHUNKS:
            for rid, data in p.split_chunks(msg):
                texts[rid] += data["text"]
        elif msg.type in (p.CHUNK, p.END):
            texts[msg.id] += p.body(msg).get("text", "")
            ended += msg.type == p.END
    return texts, types


@pytest.mark.parametrize("coalesce", [True, False])
def test_a_steps_deltas_for_one_client_ride_in_one_message(pipeline, ctx, coalesce) -> None:
    pipeline.start_broker()
    pipeline.start_worker("a", "--step-delay-ms", "10",
                          *([] if coalesce else ["--no-coalesce"]))
    pipeline.wait_workers(1)
    texts, types = _raw_run(pipeline, ctx, 8)
    assert texts == {f"r{i}": " ".join([f"w{i}"] * 20) for i in range(8)}
    chunks = types.count(p.CHUNKS)
    if coalesce:  # 19 steps of deltas for 8 requests: about one message a step, not eight
        assert chunks >= 10 and types.count(p.CHUNK) < 8 * 19 // 4, types
    else:
        assert chunks == 0 and types.count(p.CHUNK) == 8 * 19


@pytest.mark.timeout(180)
def test_256_gateway_streams_exact_with_10_cancelled_mid_stream(pipeline) -> None:
    pipeline.start_broker()
    for name in ("a", "b"):
        pipeline.start_worker(name, "--capacity", "256", "--step-delay-ms", "5")
    pipeline.wait_workers(2)
    url = start_gateway(pipeline)

    async def stream(client: httpx.AsyncClient, i: int) -> str | None:
        text, events = "", 0
        async with client.stream("POST", "/v1/completions", json={
                "model": "echo", "prompt": " ".join(f"s{i}t{k}" for k in range(80)),
                "max_tokens": 80, "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
                    events += 1
                    if i % 25 == 0 and events == 5:
                        return None  # leaving the stream: the gateway cancels it
        return text

    async def run() -> list[str | None]:
        limits = httpx.Limits(max_connections=256)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(256)))

    texts = asyncio.run(run())
    for i, text in enumerate(texts):
        if i % 25 == 0:
            assert text is None
        else:  # every token, in order
            assert text is not None and text.split() == [f"s{i}t{k}" for k in range(80)], i
    assert sum(t is None for t in texts) == 11
    with pipeline.client() as c:  # the cancelled ones stopped in their workers
        assert wait_for(lambda: all(w["in_flight"] == 0 for w in c.workers()), 10)
        stats = c.admin("stats")
    assert stats["lost"] == 0 and stats["slow_clients"] == 0, stats
