"""The gateway when what is behind it goes away: its last worker (not ready, then a clear
error) or its broker (503 with Retry-After at once, never a hang)."""

from __future__ import annotations

import os
import signal
import time

import httpx

from .conftest import wait_for
from .test_gateway import start_gateway


def test_ready_flips_when_the_last_worker_dies(pipeline) -> None:
    pipeline.start_broker()
    worker = pipeline.start_worker("only")
    pipeline.wait_workers(1)
    url = start_gateway(pipeline)
    assert httpx.get(f"{url}/ready").status_code == 200
    os.kill(worker.pid, signal.SIGKILL)
    assert wait_for(lambda: httpx.get(f"{url}/ready").status_code == 503, 10)
    r = httpx.post(f"{url}/v1/completions", json={"model": "echo", "prompt": "x"}, timeout=60)
    assert r.status_code in (404, 503)


def test_dead_broker_gives_503_not_a_hang(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("only")
    pipeline.wait_workers(1)
    url = start_gateway(pipeline)
    os.kill(pipeline.broker.pid, signal.SIGKILL)
    pipeline.broker.wait()
    t0 = time.monotonic()

    def refused() -> bool:
        r = httpx.post(f"{url}/v1/completions", json={"model": "echo", "prompt": "x"},
                       timeout=30)
        return r.status_code == 503 and r.headers.get("retry-after") == "1"

    assert wait_for(refused, 20, 0.2)
    assert time.monotonic() - t0 < 20
    assert httpx.get(f"{url}/ready").status_code == 503
    assert httpx.get(f"{url}/health").status_code == 200  # alive, just not ready
