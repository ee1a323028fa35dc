"""The fault rows of `zeroserve chaos` (chaos.py): each runs streams on the live pipeline
(chaos_stack.py), injects its fault once the streams are under way, and returns a `Row` that
says whether it met its bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from zeroserve.procs import stop
from zeroserve.tooling.chaos_stack import Stack, idle_within, restart_after_exit

STREAMS = [{"prompt": f"stream {i} says", "max_tokens": 48, "ignore_eos": True,
            **({"temperature": 0} if i % 2 else {"temperature": 0.9, "seed": i})}
           for i in range(64)]


@dataclass
class Row:
    fault: str
    requests: int
    completed: int
    errors: int
    error_codes: list[str]
    lost: int
    detect_ms: float
    settle_ms: float
    max_pause_ms: float
    bound: str
    ok: bool
    left: dict[str, Any] = field(default_factory=dict)  # what the row left behind
    note: str = ""  # why it failed, where the bound alone does not say


async def streams(stack: Stack, bodies: list[dict], model: str = "tiny",
            fault: Callable[[], Awaitable[float]] | None = None,
            after_chunks: int = 4, cut: Callable[[int], bool] = lambda i: False
            ) -> tuple[list[Any], float, float, float]:
    """Run the streams; once each has `after_chunks` chunks, run `fault` (it returns the
    detection time) and cut the streams `cut` picks. Returns each stream's token ids (or its
    error code, or "cut"), detect_ms, settle_ms and the longest pause between two chunks of
    any stream."""
    outs: list[Any] = [[] for _ in bodies]
    counts = [0] * len(bodies)
    pause = [0.0]
    async with stack.client() as c:
        async def one(i: int) -> None:
            try:
                handle = await c.submit(model, **bodies[i])
                last = time.monotonic()
                async for chunk in handle.chunks(120):
                    outs[i] += chunk.token_ids
                    counts[i] += 1
                    pause[0] = max(pause[0], time.monotonic() - last)
                    last = time.monotonic()
                    if counts[i] > after_chunks and cut(i):
                        outs[i] = "cut"
                        return  # leaving the loop cancels the request
            except Exception as exc:  # noqa: BLE001 - every failure is a row figure
                outs[i] = getattr(exc, "code", type(exc).__name__)

        tasks = [asyncio.create_task(one(i)) for i in range(len(bodies))]
        while fault and min(counts) < after_chunks and not all(t.done() for t in tasks):
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        detect = await fault() if fault else 0.0
        await asyncio.gather(*tasks)
    return outs, detect, (time.monotonic() - t0) * 1000, pause[0] * 1000


def _busiest(rows: list[dict[str, Any]], among: set[str]) -> str:
    return max((w for w in rows if w["worker_id"] in among), key=lambda w: w["in_flight"])[
        "worker_id"]


def _row(fault: str, result: tuple[list[Any], float, float, float], calm: list[Any] | None,
         bound_ms: float, expect_errors: bool = False, note: str = "") -> Row:
    outs, detect, settle, pause = result
    done = [o for o in outs if isinstance(o, list)]
    errors = [o for o in outs if isinstance(o, str) and o != "cut"]
    differ = sum(1 for o, c in zip(outs, calm or outs, strict=True)
                 if isinstance(o, list) and o != c)
    lost = differ + (0 if expect_errors else len(errors))
    ok = lost == 0 and settle <= bound_ms and (errors or not expect_errors)
    bound = f"lost 0, settle <= {bound_ms / 1000:.1f} s" + (
        ", the batch errors" if expect_errors else "")
    return Row(fault, len(outs), len(done), len(errors), sorted(set(errors)), lost,
               round(detect, 1), round(settle, 1), round(pause, 1), bound, bool(ok),
               note=note)


class Run:
    """One suite run: the undisturbed streams it compares with, and its bounds."""

    def __init__(self, stack: Stack, calm: list[Any], calm_ms: float,
                 calm_pause_ms: float = 0.0) -> None:
        self.stack, self.calm, self.calm_ms = stack, calm, calm_ms
        self.calm_pause_ms = calm_pause_ms  # the longest pause with no fault at all
        # half the workers for the rest of the run, plus the fault: on 2 shared cores the
        # restart of a killed worker (torch, the model, warmup) takes CPU from the survivor
        self.one_left = 2 * calm_ms + 15000

    async def llm(self, name: str, fault: Callable[[], Awaitable[float]], bound: float) -> Row:
        row = _row(name, await streams(self.stack, STREAMS, fault=fault), self.calm, bound)
        await self.stack.wait_workers(LLM)
        return row

    async def brokers(self, name: str, fault: Callable[[], Awaitable[float]], bound: float,
                      pause_ms: float | None = None) -> Row:
        """A broker fault: the LLM streams, then every worker registered with every broker
        again; with several brokers, the fault may add at most `pause_ms` to the longest pause
        of the undisturbed run (2 shared cores: that one is some 0.3-0.9 s already)."""
        row = _row(name, await streams(self.stack, STREAMS, fault=fault), self.calm, bound)
        if pause_ms is not None and len(self.stack.brokers) > 1:
            self.pause_within(row, pause_ms)
        await self.stack.wait_workers(LLM | {"echo"})
        return row

    def pause_within(self, row: Row, pause_ms: float) -> None:
        limit = self.calm_pause_ms + pause_ms
        row.bound += f", max pause <= calm's + {pause_ms / 1000:.1f} s ({limit / 1000:.1f} s)"
        row.ok = row.ok and row.max_pause_ms <= limit

    async def kill_busiest(self, sig: int = signal.SIGKILL) -> float:
        stack = self.stack
        victim = _busiest(await stack.workers(), LLM)
        t0 = time.monotonic()
        os.kill(stack.procs[victim].pid, sig)
        detect = await stack.wait_gone(victim, t0)
        if sig == signal.SIGSTOP:  # purged, its streams resumed elsewhere: now it comes back
            os.kill(stack.procs[victim].pid, signal.SIGCONT)
        else:
            stack.procs[victim].wait(10)
            stack.start(victim)
        return detect


LLM = {"l1", "l2"}


async def _kill_1_of_2(run: Run) -> Row:
    return await run.llm("kill-1-of-2", run.kill_busiest, run.one_left)


async def _kill_all(run: Run) -> Row:
    async def fault() -> float:
        t0 = time.monotonic()
        for name in LLM:
            os.kill(run.stack.procs[name].pid, signal.SIGKILL)
        detect = max([await run.stack.wait_gone(n, t0) for n in LLM])
        for name in LLM:
            run.stack.start(name)
        return detect

    return await run.llm("kill-all", fault, run.calm_ms + 60000)


async def _sigstop(run: Run) -> Row:
    return await run.llm("sigstop", lambda: run.kill_busiest(signal.SIGSTOP),
                         run.one_left + 750)


async def _engine_error(run: Run) -> Row:
    echo = [{"prompt": " ".join(f"w{j}" for j in range(40)), **({"fail_at": 10} if i == 0
                                                                 else {})} for i in range(8)]
    return _row("engine-error", await streams(run.stack, echo, "echo", fault=_no_fault,
                                               after_chunks=1), None, 5000, expect_errors=True)


async def _broker_restart(run: Run) -> Row:
    """kill -9 of the first broker, started again at once (the workers come back to it while
    its streams go on elsewhere)."""
    async def fault() -> float:
        t0 = time.monotonic()
        run.stack.procs["b0"].kill()
        run.stack.procs["b0"].wait()
        run.stack.start("b0")
        return (time.monotonic() - t0) * 1000

    return await run.brokers("broker-restart", fault, run.calm_ms + 20000)


async def _broker_kill(run: Run) -> Row:
    """kill -9 of the last broker, started again only after the streams ended (with one
    broker: at once): its streams go on through the other within a second."""
    name = run.stack.brokers[-1]

    async def fault() -> float:
        run.stack.procs[name].kill()
        run.stack.procs[name].wait()
        if len(run.stack.brokers) == 1:
            run.stack.start(name)
        return 0.0

    row = _row("broker-kill", await streams(run.stack, STREAMS, fault=fault), run.calm,
               run.calm_ms + 20000)
    if len(run.stack.brokers) > 1:
        run.pause_within(row, 1000)
        run.stack.start(name)
    await run.stack.wait_workers(LLM | {"echo"})
    return row


async def _broker_rolling(run: Run) -> Row:
    """Each broker in turn stopped (SIGTERM) and started again, under load."""
    async def fault() -> float:
        for name in run.stack.brokers:
            stop(run.stack.procs[name], timeout_s=10)
            run.stack.start(name)
            await run.stack.wait_workers(LLM | {"echo"})
        return 0.0

    return await run.brokers("broker-rolling", fault, run.calm_ms + 30000)


async def _broker_sigstop(run: Run) -> Row:
    """SIGSTOP of the last broker for 3 s (hung, not dead), then SIGCONT: it rejoins, and no
    stream gets anything twice."""
    async def fault() -> float:
        proc = run.stack.procs[run.stack.brokers[-1]]
        os.kill(proc.pid, signal.SIGSTOP)
        await asyncio.sleep(3.0)
        os.kill(proc.pid, signal.SIGCONT)
        return 0.0

    # clients notice a hung broker by its silence: heartbeat x liveness (1.5 s here)
    return await run.brokers("broker-sigstop", fault, run.calm_ms + 20000, pause_ms=2500)


async def _brokers_all(run: Run) -> Row:
    """kill -9 of every broker, then one started again (the others 5 s later): all resume,
    none hangs."""
    async def fault() -> float:
        for name in run.stack.brokers:
            run.stack.procs[name].kill()
            run.stack.procs[name].wait()
        await asyncio.sleep(0.5)
        first, *rest = run.stack.brokers
        run.stack.start(first)
        for name in rest:
            asyncio.get_running_loop().call_later(5.0, run.stack.start, name)
        return 0.0

    return await run.brokers("brokers-all-dead", fault, run.calm_ms + 30000)


MANY = [{**STREAMS[i % len(STREAMS)], "max_tokens": 64} for i in range(100)]


async def _cut_100(run: Run) -> Row:
    outs, detect, _, pause = await streams(run.stack, MANY, fault=_no_fault, after_chunks=1,
                                            cut=lambda i: True)
    # settled: from the last stream cut to the engines idle again (every cut stream dropped);
    # waited for past the bound, so a slow drop and a stuck one read differently
    idle_s, busy = await idle_within(run.stack, 15.0)
    return _row("cut-100", (outs, detect, idle_s * 1000 if idle_s is not None else 1e9, pause),
                None, 5000, note=busy)


async def _abort_10_of_100(run: Run) -> Row:
    return _row("abort-10-of-100", await streams(
        run.stack, MANY, fault=_no_fault, after_chunks=1, cut=lambda i: i % 10 == 0), None,
        60000)


async def _oversized(run: Run) -> Row:
    async def fault() -> float:
        import zmq

        from zeroserve import protocol as p

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(run.stack.fronts[0])
        sock.send_multipart(p.request("big", "tiny", {"prompt": "x"}, b"\0" * (64 << 20)))
        await asyncio.sleep(0.5)
        sock.close(0)
        ctx.term()
        return 0.0

    return await run.llm("oversized", fault, run.one_left)


async def _drain(run: Run) -> Row:
    async def fault() -> float:
        from zeroserve.client import AsyncClient

        victim = _busiest(await run.stack.workers(), LLM)
        t0 = time.monotonic()
        async with AsyncClient(run.stack.admin, heartbeat_interval_s=0.25) as ops:
            await ops.admin("drain", worker_id=victim)
        asyncio.get_running_loop().run_in_executor(None, restart_after_exit, run.stack, victim)
        return (time.monotonic() - t0) * 1000

    return await run.llm("drain", fault, run.one_left)


async def _slow_consumer(run: Run) -> Row:
    async def fault() -> float:
        import zmq

        from zeroserve import protocol as p

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVHWM, 4)
        sock.connect(run.stack.fronts[0])
        for i in range(8):
            sock.send_multipart(p.request(f"slow-{i}", "tiny", {
                "prompt": "never read", "max_tokens": 400, "ignore_eos": True}))
        asyncio.get_running_loop().call_later(30, lambda: (sock.close(0), ctx.term()))
        return 0.0

    return await run.llm("slow-consumer", fault, run.one_left)


async def _gateway_kill(run: Run) -> Row:
    """16 HTTP streams, then kill -9 of the gateway: settle is the time until the workers
    dropped that work (the broker cancels a silent client's requests)."""
    import httpx

    stack = run.stack
    stack.start("gateway")
    body = {"model": "tiny", "prompt": "over http", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    outs: list[Any] = []
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/ready")).status_code == 200:
                    break
            await asyncio.sleep(0.2)
        started = asyncio.Event()

        async def one() -> None:
            try:
                async with http.stream("POST", "/v1/completions", json=body) as res:
                    async for _ in res.aiter_lines():
                        started.set()
                outs.append([])
            except httpx.HTTPError:
                outs.append("cut")  # the gateway died under it: expected

        tasks = [asyncio.create_task(one()) for _ in range(16)]
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        stack.procs["gateway"].kill()
        stack.procs["gateway"].wait()
        await asyncio.gather(*tasks)
        idle_s, busy = await idle_within(stack, 10.0)
        settle = (time.monotonic() - t0) * 1000 if idle_s is not None else 1e9
        stack.start("gateway")
        served = False
        while not served and time.monotonic() - t0 < 60:
            with contextlib.suppress(httpx.HTTPError):
                res = await http.post("/v1/completions", json={**body, "stream": False,
                                                               "max_tokens": 4})
                served = res.status_code == 200
            await asyncio.sleep(0.2)
    stop(stack.procs.pop("gateway"), timeout_s=5)
    return _row("gateway-kill", (outs, 0.0, settle, 0.0), None, 5000 if served else -1,
                note=busy)


async def _no_fault() -> float:
    return 0.0


ROWS: dict[str, Callable[[Run], Awaitable[Row]]] = {
    "kill-1-of-2": _kill_1_of_2, "kill-all": _kill_all, "sigstop": _sigstop,
    "engine-error": _engine_error, "broker-kill": _broker_kill,
    "broker-restart": _broker_restart,
    "broker-rolling": _broker_rolling, "broker-sigstop": _broker_sigstop,
    "brokers-all-dead": _brokers_all, "cut-100": _cut_100,
    "abort-10-of-100": _abort_10_of_100, "oversized": _oversized, "drain": _drain,
    "gateway-kill": _gateway_kill, "slow-consumer": _slow_consumer,
}


