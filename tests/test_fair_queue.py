"""workers/fair_queue.py: round-robin across tenants, one thread kept from a tenant's big jobs."""

from __future__ import annotations

import threading

from zeroserve.workers.fair_queue import FairQueue


def test_tenants_take_turns() -> None:
    q = FairQueue(threads=4)
    for i in range(3):
        q.put("a", f"a{i}", 10)
    q.put("b", "b0", 10)
    order = []
    for _ in range(4):
        tenant, job = q.get()  # type: ignore[misc]
        order.append(job)
        q.done(tenant)
    assert order == ["a0", "b0", "a1", "a2"]


def test_a_tenants_second_big_job_leaves_the_last_thread_to_others() -> None:
    q = FairQueue(threads=2, small_bytes=100)
    q.put("a", "a-big-1", 10_000)
    q.put("a", "a-big-2", 10_000)
    assert q.get() == ("a", "a-big-1")  # one thread busy with it
    got: list = []
    taker = threading.Thread(target=lambda: got.append(q.get()))
    taker.start()
    taker.join(0.2)
    assert taker.is_alive() and not got  # a-big-2 would take the last free thread
    q.put("b", "b-small", 10)
    taker.join(5)
    assert got == [("b", "b-small")]  # b starts at once
    q.done("b")
    q.done("a")
    assert q.get() == ("a", "a-big-2")  # and a's next big job when a thread is free again
    q.put("a", "a-small", 10)
    assert q.get() == ("a", "a-small")  # small jobs never wait for that
    q.close()
    assert q.get() is None


def test_a_workers_prepare_threads_yield_the_cores_to_its_steps(pipeline, tiny_model) -> None:
    """The two prepare threads run at a lower priority (nice 5) than the engine and IO threads:
    a huge tokenization never takes a core a step needs."""
    import os

    pipeline.start_broker()
    worker = pipeline.start_worker("llm", "--model", str(tiny_model), "--served-name", "tiny",
                                   engine="llm")
    pipeline.wait_workers(1, timeout_s=120)

    def nice(tid: str) -> int:
        with open(f"/proc/{worker.pid}/task/{tid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[16])

    nices = sorted(nice(t) for t in os.listdir(f"/proc/{worker.pid}/task"))
    assert nices.count(5) == 2 and nices[0] == 0, nices
