"""Who the broker takes a worker for, and when it lets one go: pidfd watches of local
workers, READY identities that are verified, quoted or forged (broker/liveness.py and the
broker's `register`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import zmq

from zeroserve import WorkerLostError, procs
from zeroserve import protocol as p
from zeroserve.broker.liveness import PidWatch

from .conftest import wait_for


def test_pid_watch_only_trusts_a_matching_local_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = {**procs.identity(), "pid": child.pid}
        info["started"] = __import__("psutil").Process(child.pid).create_time()
        watch = PidWatch()
        assert watch.watch(b"w", {**info, "boot_id": "another-host"}) is None
        assert watch.watch(b"w", {**info, "started": info["started"] - 5}) is None  # reused pid
        assert watch.watch(b"w", {**info, "pid": "1"}) is None
        fd = watch.watch(b"w", info)
        assert fd is not None
        assert watch.watch(b"w2", info) is None  # registered again: the watch moves to w2
        child.kill()
        child.wait()
        assert watch.ended(fd) == b"w2" and not watch.identities
    finally:
        child.kill()
        child.wait()



def test_a_local_worker_that_dies_is_purged_without_waiting_for_heartbeats(pipeline) -> None:
    # heartbeats every 30 s: only the pidfd can tell the broker within the test's bound
    pipeline.start_broker("--heartbeat-interval-s", "30")
    pipeline.wait_broker()
    pipeline.start_worker("victim", "--step-delay-ms", "20")
    pipeline.start_worker("other", "--step-delay-ms", "20")
    pipeline.wait_workers(2)
    with pipeline.client() as c:
        handle = c.submit("echo", " ".join(["w"] * 200), resume=False)
        chunks = handle.chunks(20)
        next(chunks)
        victim_id = next(w["worker_id"] for w in c.workers() if w["in_flight"])
        os.kill(pipeline.workers[victim_id].pid, signal.SIGKILL)
        with pytest.raises(WorkerLostError, match="process exited"):
            list(chunks)
        assert [w["worker_id"] for w in c.workers()] == [
            "other" if victim_id == "victim" else "victim"]



def test_rogue_ready_with_a_live_worker_id_is_refused(pipeline, ctx) -> None:
    pipeline.start_broker()
    pipeline.start_worker("a")
    pipeline.wait_workers(1)
    rogue = ctx.socket(zmq.DEALER)
    rogue.connect(pipeline.backend)
    rogue.send_multipart([b"", *p.encode(p.READY, {"worker_id": "a", "models": ["echo"],
                                                   "capacity": 10_000, "pid": 1})])
    assert rogue.poll(5000)
    msg = p.decode(rogue.recv_multipart()[1:])
    assert msg.type == p.DISCONNECT and "live under another connection" in msg.header["reason"]
    with pipeline.client() as c:
        for i in range(5):
            assert c.generate("echo", f"victim {i}", timeout_s=10).text == f"victim {i}"
        rows = c.workers()
    assert [(r["worker_id"], r["pid"]) for r in rows] == [("a", pipeline.workers["a"].pid)]
    assert not rogue.poll(200)  # not one prompt reached the rogue



def test_a_worker_that_reconnects_replaces_its_own_registration(pipeline, ctx) -> None:
    # the same process (pid, boot, start time) on a new connection is a reconnect, not a rogue
    pipeline.start_broker()
    pipeline.wait_broker()
    info = {"worker_id": "w", "models": ["m"], "capacity": 2, **procs.identity()}
    first, second = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for sock in (first, second):
        sock.connect(pipeline.backend)
    first.send_multipart([b"", *p.encode(p.READY, info)])
    with pipeline.client() as c:
        assert wait_for(lambda: [w["worker_id"] for w in c.workers()] == ["w"], 10)
        second.send_multipart([b"", *p.encode(p.READY, info)])
        handle = c.submit("m", "hello")
        kinds = set()
        while p.REQUEST not in kinds and second.poll(5000):  # heartbeats come too
            kinds.add(p.decode(second.recv_multipart()[1:]).type)
        assert p.REQUEST in kinds, "the new connection gets the work"
        handle.cancel()
        assert [w["worker_id"] for w in c.workers()] == ["w"]



def test_a_peer_quoting_another_process_identity_is_never_taken_for_it(pipeline) -> None:
    """A backend peer that quotes a live worker's pid, boot and start time cannot replace its
    registration, and one that quotes an unrelated process is not watched as that process:
    the broker believes only the kernel's word (SO_PEERCRED) for which process is at the
    other end of an ipc connection."""
    import psutil

    from zeroserve import procs
    from zeroserve import protocol as p

    pipeline.start_broker()
    real = pipeline.start_worker("real")
    pipeline.wait_workers(1)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(pipeline.backend)
    try:
        ident = {"pid": real.pid, "boot_id": procs.boot_id(),
                 "started": psutil.Process(real.pid).create_time()}
        rogue.send_multipart([b"", *p.encode(p.READY, {
            "worker_id": "real", "models": ["echo"], "capacity": 8, **ident})])
        assert rogue.poll(5000), "the broker did not answer the READY"
        answer = p.decode(rogue.recv_multipart()[1:])
        assert answer.type == p.DISCONNECT and "live under another" in answer.header["reason"]
        # a quote of an unrelated process registers (heartbeats only) but is not watched
        rogue2 = ctx.socket(zmq.DEALER)
        rogue2.setsockopt(zmq.LINGER, 0)
        rogue2.connect(pipeline.backend)
        rogue2.send_multipart([b"", *p.encode(p.READY, {
            "worker_id": "rogue", "models": ["echo"], "capacity": 1, "pid": bystander.pid,
            "boot_id": procs.boot_id(),
            "started": psutil.Process(bystander.pid).create_time()})])
        with pipeline.client() as c:
            deadline = time.monotonic() + 5
            while {w["worker_id"] for w in c.workers()} != {"real", "rogue"}:
                assert time.monotonic() < deadline, c.workers()
                time.sleep(0.05)
            bystander.kill()
            bystander.wait()
            time.sleep(0.5)  # a pidfd on the bystander would have purged "rogue" by now
            assert {w["worker_id"] for w in c.workers()} == {"real", "rogue"}
            real_row = next(w for w in c.workers() if w["worker_id"] == "real")
            assert real_row["pid"] == real.pid
        rogue2.close()
        assert real.poll() is None  # the real worker never noticed
    finally:
        bystander.kill()
        bystander.wait()
        rogue.close()
        ctx.term()

