"""The gateway when what is behind it goes away: its last worker (not ready, then a clear
error) or its broker (503 with Retry-After at once, never a hang); and when its port is
taken (it says so and exits)."""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from .conftest import start_gateway, wait_for


def test_ready_flips_when_the_last_worker_dies(pipeline) -> None:
    pipeline.start_broker("--max-queue-wait-ms", "2000")  # no worker: BUSY after 2 s
    worker = pipeline.start_worker("only")
    pipeline.wait_workers(1)
    url = start_gateway(pipeline)
    assert httpx.get(f"{url}/ready").status_code == 200
    os.kill(worker.pid, signal.SIGKILL)
    assert wait_for(lambda: httpx.get(f"{url}/ready").status_code == 503, 10)
    r = httpx.post(f"{url}/v1/completions", json={"model": "echo", "prompt": "x"}, timeout=60)
    assert r.status_code in (404, 503)


def test_a_gateway_whose_port_is_taken_says_so_and_exits(pipeline) -> None:
    # with a broker answering: the worker table's first request is in flight as the gateway
    # shuts down, and a cancel that raced its reply used to be lost (it hung, every time)
    pipeline.start_broker()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = pipeline.spawn("gateway", "gateway-taken",
                                 ["--broker", pipeline.frontend, "--port", str(port)])
        assert gateway.wait(timeout=30) != 0
    assert "address already in use" in pipeline.logs[-1].read_text()


def test_dead_broker_gives_503_not_a_hang(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("only")
    pipeline.wait_workers(1)
    url = start_gateway(pipeline)
    os.kill(pipeline.broker.pid, signal.SIGKILL)
    pipeline.broker.wait()
    # its heartbeats stop: within their expiry (3 s) the gateway knows, and says so
    assert wait_for(lambda: httpx.get(f"{url}/ready").json()["broker"] == "silent", 10, 0.2)
    assert httpx.get(f"{url}/ready").status_code == 503
    assert httpx.get(f"{url}/health").status_code == 200  # alive, just not ready
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"model": "echo", "prompt": "x"}, timeout=30)
    assert r.status_code == 503 and r.headers.get("retry-after") == "1"
    assert time.monotonic() - t0 < 2  # at once: not queued behind a broker that is gone


def test_a_full_queue_is_503_busy_over_http(pipeline) -> None:
    pipeline.start_broker("--max-queue", "1")
    pipeline.start_worker("only", "--capacity", "1", "--step-delay-ms", "50")
    pipeline.wait_workers(1)
    url = start_gateway(pipeline)
    body = {"model": "echo", "prompt": " ".join(["w"] * 200), "max_tokens": 200}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=60) as running, pipeline.client() as c:
        assert running.status_code == 200  # the worker's one seat is taken
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(httpx.post, f"{url}/v1/completions", json={**body,
                                 "max_tokens": 1}, timeout=60)
            assert wait_for(lambda: c.admin("stats")["queued"] == 1, 10)  # the queue is full
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "server_overloaded"
            running.close()  # the client leaves: its seat goes to the queued request
            assert queued.result(60).status_code == 200


def test_a_generation_that_loses_every_worker_is_502(pipeline) -> None:
    pipeline.start_broker()
    for name in ("a", "b", "c"):
        pipeline.start_worker(name, "--step-delay-ms", "50")
    pipeline.wait_workers(3)
    url = start_gateway(pipeline)
    body = {"model": "echo", "prompt": " ".join(["w"] * 400), "max_tokens": 400}
    with ThreadPoolExecutor(1) as pool, pipeline.client() as c:
        reply = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=90)
        for _ in range(3):  # the SDK resumes it twice on another worker, then gives up
            serving = wait_for(lambda: next((  # streaming on it (lost before that: resent)
                w["worker_id"] for w in c.workers()
                if w["in_flight"] and (w.get("stats") or {}).get("steps", 0) >= 3), None), 20)
            assert serving, c.workers()
            os.kill(pipeline.workers[serving].pid, signal.SIGKILL)
            assert wait_for(lambda s=serving: s not in [w["worker_id"] for w in c.workers()],
                            10)
        r = reply.result(60)
    assert r.status_code == 502 and r.json()["error"]["type"] == "worker_lost", r.text
