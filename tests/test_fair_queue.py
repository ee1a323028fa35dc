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
