"""`zeroserve bench slowloris`: does a gateway held by idle and slow clients still serve?

Starts a broker, one echo worker and one gateway process (default limits) on a free port, then
times a normal client's requests (sequential /v1/completions on one kept-alive connection, for
--round-s seconds) in rounds that alternate: a quiet gateway, then the same gateway while this
process holds --idle connections that send nothing and --slow connections that send a request
head one header line a second (each reopened as soon as the gateway closes it, so the pressure
holds). Prints the normal client's p50 and p99 in each kind of round, their ratio, and what
the gateway did to the hostile connections. The goal: loaded p50 within 1.5x of quiet p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import socket
import statistics
import tempfile
import time

from zeroserve.procs import exit_on_sigterm, spawn, stop_all
from zeroserve.tooling.bench.stats import percentile, report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_ready(port: int, timeout_s: float) -> bool:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return True
        time.sleep(0.2)
    return False


class Hostile:
    """Idle and slow-header connections, each reopened when the gateway closes it."""

    def __init__(self, port: int, idle: int, slow: int) -> None:
        self.port, self.idle, self.slow = port, idle, slow
        self.closed_by_gateway = 0
        self.answers: dict[str, int] = {}
        self.tasks: list[asyncio.Task] = []
        self.open = 0

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._hold(drip=False)) for _ in range(self.idle)]
        self.tasks += [asyncio.create_task(self._hold(drip=True)) for _ in range(self.slow)]
        while self.open < self.idle + self.slow:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _hold(self, drip: bool) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.open += 1
            try:
                data = b""
                if drip:
                    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                    for i in range(10_000):
                        writer.write(b"X-Slow-%d: y\r\n" % i)
                        await writer.drain()
                        try:
                            data = await asyncio.wait_for(reader.read(64), 1.0)
                            break  # answered, or closed
                        except TimeoutError:
                            pass
                else:
                    data = await reader.read(64)  # until the gateway answers or closes
                status = data[9:12].decode() if data.startswith(b"HTTP/") else "closed"
                self.answers[status] = self.answers.get(status, 0) + 1
                self.closed_by_gateway += 1
            except (OSError, asyncio.IncompleteReadError):
                self.closed_by_gateway += 1
            finally:
                self.open -= 1
                writer.close()


async def timed_requests(port: int, seconds: float) -> list[float]:
    import httpx

    out: list[float] = []
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        for i in itertools.count():
            if time.monotonic() > end:
                break
            t0 = time.perf_counter()
            resp = await client.post("/v1/completions", json={
                "model": "echo", "prompt": f"request {i} is here", "max_tokens": 4})
            resp.raise_for_status()
            out.append((time.perf_counter() - t0) * 1000)
    return out


async def run(port: int, rounds: int, n: float, idle: int, slow: int) -> dict[str, float]:
    quiet: list[list[float]] = []
    loaded: list[list[float]] = []
    hostile = Hostile(port, idle, slow)
    await timed_requests(port, 1.0)  # warm up
    for _ in range(rounds):
        quiet.append(await timed_requests(port, n))
        hostile = Hostile(port, idle, slow)
        await hostile.start()
        loaded.append(await timed_requests(port, n))
        await hostile.stop()
    ratios = [statistics.median(b) / statistics.median(a) for a, b in zip(quiet, loaded,
                                                                           strict=True)]
    flat_q = [x for r in quiet for x in r]
    flat_l = [x for r in loaded for x in r]
    return {"idle_connections": idle, "slow_header_connections": slow,
            "seconds_per_round": n, "rounds": rounds, "requests": len(flat_q) + len(flat_l),
            "quiet_p50_ms": percentile(flat_q, 50), "quiet_p99_ms": percentile(flat_q, 99),
            "loaded_p50_ms": percentile(flat_l, 50), "loaded_p99_ms": percentile(flat_l, 99),
            "p50_ratio_median_of_rounds": statistics.median(ratios),
            "p50_ratio_worst_round": max(ratios),
            "hostile_closed_by_gateway_last_round": hostile.closed_by_gateway,
            **{f"hostile_answered_{k}": v for k, v in sorted(hostile.answers.items())}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve bench slowloris", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle", type=int, default=1000)
    ap.add_argument("--slow", type=int, default=50)
    ap.add_argument("--round-s", type=float, default=15.0,
                    help="seconds of requests per round (over the 10 s header timeout)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    from zeroserve.gateway.cli import raise_fd_limit
    from zeroserve.tooling.up import wait_ready

    raise_fd_limit(args.idle + args.slow + 256)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="zs-slowloris-") as tmp:
        front, back = f"ipc://{tmp}/f", f"ipc://{tmp}/b"
        procs = [spawn("broker", ["--frontend", front, "--backend", back,
                                  "--admin", f"ipc://{tmp}/a", "--log-level", "WARNING"]),
                 spawn("worker", ["--broker", back, "--log-level", "WARNING"]),
                 spawn("gateway", ["--broker", front, "--port", str(port),
                                   "--log-level", "WARNING"])]
        try:
            if not wait_ready(front, 1, 120, procs) or not gateway_ready(port, 60):
                raise RuntimeError("the pipeline did not come up")
            res = asyncio.run(run(port, args.rounds, args.round_s, args.idle, args.slow))
        finally:
            stop_all(procs)
    report(res, args.json, "zeroserve bench slowloris")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
