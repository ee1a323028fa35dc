"""Broker: the real process under load, faults and garbage (table.py: test_table.py)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
import zmq

from zeroserve import (
    AsyncClient,
    BadRequestError,
    BusyError,
    Client,
    UnknownModelError,
    WorkerLostError,
)
from zeroserve import protocol as p

from .conftest import wait_for

# -- end to end: real broker, real workers -----------------------------------------------


def test_a_second_broker_on_live_endpoints_refuses_and_the_first_serves_on(pipeline) -> None:
    """A broker started by mistake where one runs (a second `zeroserve up`): it exits 2
    saying why, instead of silently taking over the ipc paths and orphaning the first."""
    first = pipeline.start_broker()
    pipeline.start_worker("a")
    pipeline.wait_workers(1)
    second = pipeline.spawn("broker", "broker-again", [
        "--frontend", pipeline.frontend, "--backend", pipeline.backend,
        "--admin", pipeline.admin])
    assert second.wait(timeout=30) == 2
    assert "a live process listens there" in pipeline.logs[-1].read_text()
    assert first.poll() is None
    with Client(pipeline.frontend) as client:  # new clients still reach the first
        assert client.generate("echo", "still here", timeout_s=30).text == "still here"


def test_1000_pipelined_requests_over_one_socket(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("a", "--capacity", "128")
    pipeline.start_worker("b", "--capacity", "128")
    pipeline.wait_workers(2)

    async def run() -> list:
        async with AsyncClient(pipeline.frontend) as client:
            prompts = [" ".join(f"r{i}t{k}" for k in range(1 + i % 5)) for i in range(1000)]
            handles = [await client.submit("echo", pr) for pr in prompts]
            outs = []
            for pr, h in zip(prompts, handles, strict=True):
                ids: list[int] = []
                async for chunk in h.chunks(30):
                    ids.extend(chunk.token_ids)
                    text = chunk.text
                outs.append((pr, ids, text))
            return outs

    outs = asyncio.run(run())
    assert len(outs) == 1000
    for prompt, ids, _ in outs:
        assert ids == list(range(len(prompt.split())))  # every chunk, in order
    with pipeline.client() as c:
        served = {w["worker_id"]: w["served"] for w in c.workers()}
    assert served["a"] > 100 and served["b"] > 100 and sum(served.values()) >= 1000


def test_replies_match_requests_under_sync_client(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("a")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        handles = [(i, c.submit("echo", f"x{i} y{i}")) for i in range(200)]
        for i, h in handles:
            assert h.result(10).text == f"x{i} y{i}"


def test_load_aware_routing_sends_fewer_requests_to_the_slow_worker(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("slow", "--capacity", "4", "--step-delay-ms", "40")
    pipeline.start_worker("fast", "--capacity", "4", "--step-delay-ms", "2")
    pipeline.wait_workers(2)
    with pipeline.client() as c:
        handles = [c.submit("echo", "a b c d") for _ in range(120)]
        for h in handles:
            h.result(60)
        served = {w["worker_id"]: w["served"] for w in c.workers()}
    assert served["fast"] > 2 * served["slow"], served


def test_cancel_mid_stream_stops_within_a_step(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("a", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    words = " ".join(f"w{i}" for i in range(500))
    with pipeline.client() as c:
        stream = c.stream("echo", words)
        got = [next(stream) for _ in range(3)]
        assert got
        stream.close()  # breaking out cancels
        row = wait_for(lambda: next((r for r in c.workers()
                                     if r["in_flight"] == 0 and "steps" in r["stats"]), None))
        assert row["in_flight"] == 0
        # the worker stopped the request: its step count stays far below 500
        assert row["stats"]["steps"] < 100


def test_unknown_model_is_rejected(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("a")
    pipeline.wait_workers(1)
    with pipeline.client() as c, pytest.raises(UnknownModelError):
        c.generate("nope", "x", timeout_s=5)


def test_kill_9_worker_mid_stream(pipeline) -> None:
    pipeline.start_broker()
    victim = pipeline.start_worker("victim", "--capacity", "4", "--step-delay-ms", "50")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        long_prompt = " ".join(["tok"] * 400)
        # fill its credit (resume=False: the started streams fail; test_resume.py resumes)
        streaming = [c.submit("echo", long_prompt, resume=False) for _ in range(4)]
        waiting = [c.submit("echo", "a b c") for _ in range(4)]  # queued behind them
        iters = [h.chunks(10) for h in streaming]
        for it in iters:
            next(it)
        pipeline.start_worker("survivor", "--capacity", "1", "--step-delay-ms", "30")
        # the survivor takes queued work only once the victim is gone
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        for it in iters:
            with pytest.raises(WorkerLostError):
                list(it)
        assert time.monotonic() - t0 < 0.25 * 3 + 1.0  # heartbeat x liveness, plus slack
        for h in waiting:
            assert h.result(20).text == "a b c"
        assert c.generate("echo", "after", timeout_s=10).text == "after"
        assert [w["worker_id"] for w in c.workers()] == ["survivor"]


def test_broker_restart_workers_reregister_and_unstarted_requests_succeed(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("a")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        assert c.generate("echo", "before", timeout_s=5).text == "before"
        os.kill(pipeline.broker.pid, signal.SIGKILL)
        pipeline.broker.wait()
        pending = [c.submit("echo", f"during {i}") for i in range(10)]
        time.sleep(0.5)
        pipeline.start_broker()
        for i, h in enumerate(pending):
            assert h.result(20).text == f"during {i}"
        pipeline.wait_workers(1)


def test_random_and_malformed_frames_do_not_hurt_the_broker(pipeline, ctx) -> None:
    pipeline.start_broker()
    pipeline.start_worker("a")
    pipeline.wait_workers(1)
    rng = random.Random(7)
    fronts = [ctx.socket(zmq.DEALER) for _ in range(2)]
    back = ctx.socket(zmq.DEALER)
    for s in fronts:
        s.connect(pipeline.frontend)
    back.connect(pipeline.backend)
    templates = [
        lambda: [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 6))],
        lambda: [p.VERSION, bytes([rng.randint(0, 20)]), rng.randbytes(rng.randint(0, 30))],
        lambda: [p.VERSION, p.REQUEST, p.packb({"id": rng.randint(0, 9), "model": None})],
        lambda: [p.VERSION, p.REQUEST, p.packb({"id": "x", "model": "echo"}), b"\xc1garbage"],
        lambda: [p.VERSION, p.CANCEL, p.packb({"id": "nope"})],
        lambda: [p.VERSION, p.END, p.packb({"id": "r"}), b"\x80"],
        lambda: [p.VERSION, p.READY, p.packb({"models": "x", "capacity": "lots"})],
        lambda: [p.VERSION, p.ADMIN, p.packb({"id": "a", "op": "explode"})],
    ]
    for i in range(10_000):
        frames = rng.choice(templates)()
        (back if i % 3 == 0 else fronts[i % 2]).send_multipart(frames)
    errors_seen = 0
    for s in fronts:
        while s.poll(200):
            msg = p.decode(s.recv_multipart())
            errors_seen += msg.type == p.ERROR
    assert errors_seen > 1000  # garbage is answered, not swallowed
    with pipeline.client() as c:
        assert c.generate("echo", "still here", timeout_s=10).text == "still here"
    assert pipeline.broker.poll() is None


def test_overload_gives_busy_at_once(pipeline) -> None:
    pipeline.start_broker("--max-queue", "2")
    pipeline.start_worker("a", "--capacity", "2", "--step-delay-ms", "50")
    pipeline.wait_workers(1)
    long_prompt = " ".join(["t"] * 100)
    with pipeline.client() as c:
        running = [c.submit("echo", long_prompt) for _ in range(2)]
        queued = [c.submit("echo", long_prompt) for _ in range(2)]
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(BusyError):
            c.generate("echo", "one more", timeout_s=5)
        assert time.monotonic() - t0 < 0.5
        for h in running + queued:
            h.cancel()


def test_queue_wait_expiry_gives_busy(pipeline) -> None:
    pipeline.start_broker("--max-queue-wait-ms", "300")
    pipeline.start_worker("a", "--capacity", "1", "--step-delay-ms", "50")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        running = c.submit("echo", " ".join(["t"] * 100))
        with pytest.raises(BusyError):
            c.generate("echo", "waits too long", timeout_s=5)
        running.cancel()


def test_admin_drain_finishes_in_flight_then_worker_exits(pipeline) -> None:
    pipeline.start_broker()
    worker = pipeline.start_worker("a", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        h = c.submit("echo", " ".join(["t"] * 20))
        chunks = h.chunks(10)
        first = next(chunks)
        with pytest.raises(BadRequestError, match="admin endpoint"):
            c.admin("drain", worker_id="a")  # any client reaches the frontend: refused there
        assert c.workers()[0]["draining"] is False
        with Client(pipeline.admin, heartbeat_interval_s=0.25) as admin:
            row = admin.admin("drain", worker_id="a")
        assert row["draining"] is True
        rest = [i for ch in chunks for i in ch.token_ids]
        assert first.token_ids + rest == list(range(20))  # in-flight work finished
        assert worker.wait(10) == 0
        assert c.workers() == []


def _raw_client_with_a_long_stream(pipeline, ctx, rid: str, words: int) -> zmq.Socket:
    """A raw DEALER (no SDK, so no heartbeats) that asked one echo worker for a long stream."""
    pipeline.start_broker()
    pipeline.start_worker("a", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    raw = ctx.socket(zmq.DEALER)
    raw.connect(pipeline.frontend)
    raw.send_multipart(p.request(rid, "echo", {"prompt": " ".join(["t"] * words)}))
    return raw


def test_client_that_vanishes_has_its_requests_cancelled(pipeline, ctx) -> None:
    raw = _raw_client_with_a_long_stream(pipeline, ctx, "r1", 1000)
    raw.recv_multipart()  # first chunk: it runs
    raw.close(0)  # gone without a word; no heartbeats either
    with pipeline.client() as c:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and c.workers()[0]["in_flight"]:
            time.sleep(0.1)
        assert c.workers()[0]["in_flight"] == 0


def test_oversized_frame_is_dropped_and_the_broker_goes_on(pipeline, ctx) -> None:
    pipeline.start_broker("--max-message-mb", "1")
    pipeline.start_worker("a")
    pipeline.wait_workers(1)
    raw = ctx.socket(zmq.DEALER)
    raw.connect(pipeline.frontend)

    def reply(rid: str) -> p.Message:
        while raw.poll(10_000):
            msg = p.decode(raw.recv_multipart())
            if msg.header.get("id") == rid and msg.type in (p.END, p.ERROR):
                return msg
        raise AssertionError(f"no reply to {rid}")

    # one frame over the limit: ZeroMQ drops the connection under it, nothing is answered
    raw.send_multipart(p.request("huge", "echo", {"prompt": "x" * (2 << 20)}))
    assert not raw.poll(500)
    # frames each under it, together over it: refused by name, before any is decoded
    raw.send_multipart(p.request("split", "echo", {"prompt": "x"}, b"y" * (600 << 10),
                                 b"z" * (600 << 10)))
    refused = reply("split")
    assert refused.type == p.ERROR and refused.header["code"] == p.BAD_REQUEST
    raw.send_multipart(p.request("small", "echo", {"prompt": "still fine"}))  # the same socket
    assert reply("small").type == p.END
    assert pipeline.broker.poll() is None


def test_a_silent_client_is_told_its_requests_were_cancelled(pipeline, ctx) -> None:
    sock = _raw_client_with_a_long_stream(pipeline, ctx, "slow-1", 500)
    time.sleep(1.5)  # no heartbeat for longer than 0.25 s x 3: the broker gives up on us
    kinds = []
    while sock.poll(2000):
        msg = p.decode(sock.recv_multipart())
        kinds.append(msg.type)
        if msg.type == p.ERROR:
            assert msg.header["code"] == p.UNAVAILABLE and "silent" in msg.header["message"]
            break
    assert kinds[-1] == p.ERROR, kinds  # not left waiting for replies that never come
    with pipeline.client() as c:
        assert wait_for(lambda: c.workers()[0]["in_flight"] == 0, 5)


def test_a_full_pipe_to_a_worker_is_a_backlog_not_a_dead_worker(pipeline) -> None:
    # the worker stops reading for a second while 300 requests come: with a high-water mark
    # of 10 its pipe fills; the broker keeps the rest for it instead of purging it
    beat = ("--heartbeat-interval-s", "1")
    pipeline.start_broker("--hwm", "10", *beat)
    worker = pipeline.start_worker("a", "--capacity", "400", *beat)
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            handles = [c.submit("echo", f"r{i} x") for i in range(300)]
            time.sleep(1.0)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert [h.result(30).text for h in handles] == [f"r{i} x" for i in range(300)]
        stats = c.admin("stats")
        assert stats["lost"] == 0 and [w["worker_id"] for w in c.workers()] == ["a"], stats
    assert "purged" not in pipeline.dump_logs()


def test_a_queued_request_past_its_deadline_fails_without_reaching_a_worker(pipeline) -> None:
    from zeroserve import RequestTimeoutError

    pipeline.start_broker()
    pipeline.start_worker("w", "--capacity", "1", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        busy = c.submit("echo", " ".join(["w"] * 60))  # holds the only seat ~1.2 s
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="deadline"):
            c.generate("echo", "late", timeout=0.3, timeout_s=10)
        assert time.monotonic() - t0 < 1.0  # at its deadline, not when the seat freed
        assert busy.result(10).text.startswith("w")
        time.sleep(0.3)
        worker = c.workers()[0]
        assert worker["served"] == 1  # the late one never reached it
        assert c.admin("stats")["timeout"] == 1


def test_a_deadline_that_is_not_a_time_is_refused_and_the_queue_stays_sound(pipeline) -> None:
    """A hostile header deadline (NaN, infinite, negative) would unsort the broker's expiry
    heap: refused with BAD_REQUEST, and deadlines keep working afterwards."""
    import msgpack

    from zeroserve import RequestTimeoutError
    from zeroserve import protocol as p

    pipeline.start_broker()
    pipeline.start_worker("w", "--capacity", "1", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(pipeline.frontend)
    try:
        for i, bad in enumerate((float("nan"), float("inf"), -1.0)):
            head = {"id": f"bad-{i}", "model": "echo", "deadline": bad}
            raw.send_multipart([p.VERSION, p.REQUEST, msgpack.packb(head),
                                msgpack.packb({"prompt": "x"})])
            assert raw.poll(5000)
            answer = p.decode(raw.recv_multipart())
            assert answer.type == p.ERROR and answer.header["code"] == p.BAD_REQUEST
    finally:
        raw.close()
        ctx.term()
    with pipeline.client() as c:
        busy = c.submit("echo", " ".join(["w"] * 40))
        with pytest.raises(RequestTimeoutError):
            c.generate("echo", "late", timeout=0.2, timeout_s=10)
        assert busy.result(10).text.startswith("w")


def test_a_new_broker_waits_for_its_workers_before_calling_a_model_unknown(pipeline) -> None:
    """Right after a broker (re)starts, its workers register again one by one: a request for a
    model whose worker is not back yet waits for it instead of failing UNKNOWN_MODEL (it did:
    32 of 64 streams in one chaos run with every broker restarted)."""
    pipeline.start_broker("--heartbeat-interval-s", "2")  # workers are back within 6 s
    pipeline.start_worker("first")  # serves echo
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        handle = c.submit("late", "still served", max_tokens=2)
        pipeline.start_worker("late-one", "--model", "late")
        assert handle.result(30).text == "still served"
