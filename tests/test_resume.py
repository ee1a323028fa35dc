"""End to end: a worker killed mid-stream costs its clients a pause, not an error.

Real broker and workers; the worker serving the streams gets SIGKILL while they run. Every
stream must finish with exactly the text (and tokens) of an undisturbed run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import time

import httpx
import pytest

from zeroserve import AsyncClient, WorkerLostError

from .conftest import Pipeline, start_gateway, wait_for

WORDS = " ".join(f"w{i}" for i in range(60))


def _two_echo_workers(pipeline: Pipeline) -> None:
    pipeline.start_broker()
    pipeline.wait_broker()
    for name in ("e1", "e2"):
        pipeline.start_worker(name, "--step-delay-ms", "20")
    pipeline.wait_workers(2)


def _busiest(pipeline: Pipeline) -> str:
    """The id of the worker with the most requests in flight, once any has some."""
    with pipeline.client() as c:
        rows = wait_for(lambda: [w for w in c.workers() if w["in_flight"]], 20)
        assert rows, pipeline.dump_logs()
        return max(rows, key=lambda w: w["in_flight"])["worker_id"]


async def _streams(pipeline: Pipeline, bodies: list[dict], model: str,
                   kill_after_chunks: int | None = None) -> tuple[list, list[float]]:
    """Run the streams at once; with kill_after_chunks, SIGKILL the busiest worker once every
    stream has that many chunks. Returns each stream's (text, token ids) and its largest gap
    between two chunks."""
    texts: list[list] = [["", []] for _ in bodies]
    gaps = [0.0] * len(bodies)

    async with AsyncClient(pipeline.frontend, heartbeat_interval_s=0.25) as c:
        async def one(i: int, body: dict) -> None:
            handle = await c.submit(model, **body)
            last = time.monotonic()
            async for chunk in handle.chunks(120):
                texts[i][0] += chunk.text
                texts[i][1] += chunk.token_ids
                now = time.monotonic()
                gaps[i] = max(gaps[i], now - last)
                last = now

        tasks = [asyncio.create_task(one(i, b)) for i, b in enumerate(bodies)]
        if kill_after_chunks is not None:
            # chunks merge while a reader lags: wait for tokens, and never past the streams
            while min(len(ids) for _, ids in texts) < kill_after_chunks:
                failed = [t for t in tasks if t.done() and t.exception()]
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
                assert not all(t.done() for t in tasks), "every stream ended before the kill"
                await asyncio.sleep(0.01)
            # asked through this client, already connected: no pause in which the streams
            # could end before the kill
            rows = [w for w in await c.workers() if w["in_flight"]]
            assert rows, "no worker had a stream in flight at the kill"
            victim = max(rows, key=lambda w: w["in_flight"])["worker_id"]
            os.kill(pipeline.workers[victim].pid, signal.SIGKILL)
        await asyncio.gather(*tasks)
    return texts, gaps


@pytest.mark.timeout(120)
def test_echo_streams_survive_a_kill_9_with_nothing_repeated_or_missing(pipeline) -> None:
    _two_echo_workers(pipeline)
    bodies = [{"prompt": WORDS} for _ in range(8)]
    texts, gaps = asyncio.run(_streams(pipeline, bodies, "echo", kill_after_chunks=5))
    assert [t for t, _ in texts] == [WORDS] * 8, pipeline.dump_logs()
    assert [ids for _, ids in texts] == [list(range(60))] * 8
    print(f"largest pause in a resumed stream: {max(gaps) * 1000:.0f} ms")


@pytest.mark.timeout(120)
def test_opting_out_of_resume_gets_worker_lost(pipeline) -> None:
    _two_echo_workers(pipeline)
    with pipeline.client() as c:
        handle = c.submit("echo", WORDS, resume=False)
        chunks = handle.chunks(60)
        next(chunks)
        os.kill(pipeline.workers[_busiest(pipeline)].pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError):
            list(chunks)


@pytest.mark.timeout(300)
def test_llm_greedy_and_seeded_streams_resume_identically(pipeline, tiny_model) -> None:
    pipeline.start_broker()
    pipeline.wait_broker()
    for name in ("l1", "l2"):
        pipeline.start_worker(name, "--model", str(tiny_model), "--served-name", "tiny",
                              "--max-model-len", "512", "--dtype", "float32", engine="llm")
    pipeline.wait_workers(2, timeout_s=120)
    # long enough that the kill lands mid-stream however fast the tiny model runs
    bodies = [{"prompt": f"stream {i} says", "max_tokens": 400, "ignore_eos": True,
               **({"temperature": 0} if i % 2 else {"temperature": 0.9, "seed": i})}
              for i in range(8)]
    calm, _ = asyncio.run(_streams(pipeline, bodies, "tiny"))
    hit, gaps = asyncio.run(_streams(pipeline, bodies, "tiny", kill_after_chunks=4))
    assert [ids for _, ids in hit] == [ids for _, ids in calm], pipeline.dump_logs()
    assert [t for t, _ in hit] == [t for t, _ in calm]
    assert all(len(ids) == 400 for _, ids in hit)
    print(f"largest pause in a resumed stream: {max(gaps) * 1000:.0f} ms")


@pytest.mark.timeout(120)
def test_a_stopped_worker_is_purged_its_streams_resume_and_it_comes_back(pipeline) -> None:
    _two_echo_workers(pipeline)

    async def run() -> list:
        async with AsyncClient(pipeline.frontend, heartbeat_interval_s=0.25) as c:
            handles = [await c.submit("echo", WORDS) for _ in range(6)]
            await asyncio.sleep(0.3)
            victim = _busiest(pipeline)
            os.kill(pipeline.workers[victim].pid, signal.SIGSTOP)  # heartbeats stop
            return [(await h.result(60)).text for h in handles], victim

    texts, victim = asyncio.run(run())
    assert texts == [WORDS] * 6, pipeline.dump_logs()
    proc = pipeline.workers[victim]
    os.kill(proc.pid, signal.SIGCONT)  # the broker never kills it: it comes back by itself
    with pipeline.client() as c:
        assert wait_for(lambda: victim in {w["worker_id"] for w in c.workers()}, 20)
        assert c.generate("echo", "served again", timeout_s=10).text == "served again"
    assert proc.poll() is None


@pytest.mark.timeout(120)
def test_a_hung_engine_exits_after_the_progress_timeout(pipeline) -> None:
    pipeline.start_broker()
    pipeline.wait_broker()
    worker = pipeline.start_worker("hung", "--progress-timeout-s", "1")
    pipeline.wait_workers(1)
    with pipeline.client() as c, pytest.raises(WorkerLostError, match="engine hung"):
        c.submit("echo", WORDS, stall_at=3, resume=False).result(30)
    assert worker.wait(10) == 70
    assert "progress timeout" in pipeline.dump_logs()


@pytest.mark.timeout(120)
def test_http_requests_through_the_gateway_survive_a_kill_9(pipeline) -> None:
    _two_echo_workers(pipeline)
    url = start_gateway(pipeline)

    def call(i: int) -> httpx.Response:
        body = {"model": "echo", "prompt": WORDS, "max_tokens": 60, "stream": i % 2 == 1}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, i) for i in range(8)]
        time.sleep(0.4)
        os.kill(pipeline.workers[_busiest(pipeline)].pid, signal.SIGKILL)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 8, pipeline.dump_logs()
    for i, r in enumerate(responses):
        if i % 2 == 0:
            assert r.json()["choices"][0]["text"] == WORDS
        else:  # SSE: the deltas join up to the whole text
            deltas = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            assert "".join(d["choices"][0]["text"] for d in deltas) == WORDS
