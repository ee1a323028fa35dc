"""The broker's table (broker/table.py): routing, the fair bounded queue, job ownership."""

from __future__ import annotations

import time

from zeroserve.broker.table import Job, Table


def _table_with(*caps: int) -> Table:
    table = Table(max_queue=2, max_queue_wait_s=1.0)
    for i, cap in enumerate(caps):
        table.register(bytes([i]), {"worker_id": f"w{i}", "models": ["m"], "capacity": cap}, 1e9)
    return table


def test_queues_of_client_chosen_model_names_do_not_pile_up() -> None:
    table = Table(max_queue=10, max_queue_wait_s=0.0)
    for i in range(3000):  # enqueue + cancel, as a client sending random model names would
        job = Job(b"c", f"r{i}", f"model-{i}", [], 0.0)
        table.enqueue(job)
        assert table.unqueue(job)
    expired = Job(b"c", "old", "model-x", [], 0.0)
    table.enqueue(expired)
    assert [j for j, _, _ in table.expired_jobs(1.0)] == [expired]
    assert table.queues == {} and table.queued == 0


def test_a_burst_spreads_by_load_not_by_who_announced_its_larger_share_first() -> None:
    """A broker was lost: each worker's share here doubles, but one READY lands first. The
    requests its clients resend in that moment still spread evenly (by slots, which did not
    move), not all to the worker that re-announced first (seen in chaos: 32 of 32)."""
    table = Table(max_queue=2, max_queue_wait_s=1.0)
    for i in range(2):
        table.register(bytes([i]), {"worker_id": f"w{i}", "models": ["m"], "capacity": 48,
                                    "slots": 96}, 1e9)
        for k in range(16):
            table.assign(Job(b"c", f"{i}-{k}", "m", [], 0.0), table.workers[bytes([i])])
    table.register(b"\x01", {"worker_id": "w1", "models": ["m"], "capacity": 96,
                              "slots": 96}, 1e9)
    picks = []
    for k in range(32):
        worker = table.pick_worker("m")
        table.assign(Job(b"c", f"again-{k}", "m", [], 0.0), worker)
        picks.append(worker.worker_id)
    assert picks.count("w0") == picks.count("w1") == 16
    # a READY cannot claim fewer slots than its credit
    table.register(b"\x00", {"worker_id": "w0", "models": ["m"], "capacity": 48, "slots": 2},
                   1e9)
    assert table.workers[b"\x00"].slots == 48


def test_pick_worker_prefers_most_free_credit_and_rotates_ties() -> None:
    table = _table_with(4, 4)
    picks = [table.pick_worker("m").worker_id for _ in range(4)]
    assert set(picks) == {"w0", "w1"}  # ties rotate
    w0 = table.workers[b"\x00"]
    for i in range(3):
        table.assign(Job(b"c", str(i), "m", [], 0.0), w0)
    assert all(table.pick_worker("m").worker_id == "w1" for _ in range(3))
    assert table.pick_worker("other") is None


def test_full_workers_give_no_pick_and_queue_is_bounded() -> None:
    table = _table_with(1)
    table.assign(Job(b"c", "a", "m", [], 0.0), table.workers[b"\x00"])
    assert table.pick_worker("m") is None
    for rid in ("q1", "q2"):
        job = Job(b"c", rid, "m", [], time.monotonic())
        assert table.why_not_enqueue(job) is None
        table.enqueue(job)
    assert table.why_not_enqueue(Job(b"d", "q3", "m", [], 0.0)) == "all workers busy and queue full"


def test_purge_requeues_unstarted_once_and_loses_streamed() -> None:
    table = _table_with(4)
    w = table.workers[b"\x00"]
    fresh, streamed = Job(b"c", "a", "m", [], 0.0), Job(b"c", "b", "m", [], 0.0, streamed=True)
    gone = Job(b"c", "x", "m", [], 0.0, cancelled=True)
    for job in (fresh, streamed, gone):
        table.add(job)
        table.assign(job, w)
    requeue, lost, cancelled = table.remove_worker(w)
    assert requeue == [fresh] and lost == [streamed] and fresh.requeued and cancelled == [gone]
    assert set(table.jobs) == {fresh.key} and table.jobs_of_client(b"c") == [fresh]


def test_one_client_or_tenant_cannot_take_the_whole_queue() -> None:
    table = Table(max_queue=8, max_queue_wait_s=1.0, client_share=0.5, tenant_share=0.25)
    hog = [Job(b"hog", f"h{i}", "m", [b"x"], 0.0) for i in range(5)]
    for job in hog[:4]:
        assert table.why_not_enqueue(job) is None
        table.enqueue(job)
    assert "client's share" in table.why_not_enqueue(hog[4])
    other = Job(b"other", "o", "m", [b"x"], 0.0)
    assert table.why_not_enqueue(other) is None  # the rest of the queue is still there
    gw = [Job(b"gw", f"g{i}", "m", [b"x"], 0.0, tenant="key-a") for i in range(3)]
    for job in gw[:2]:
        table.enqueue(job)
    assert "tenant's share" in table.why_not_enqueue(gw[2])
    assert table.why_not_enqueue(Job(b"gw", "b", "m", [b"x"], 0.0, tenant="key-b")) is None
    for job in (*hog[:4], *gw[:2]):
        assert table.unqueue(job)
    assert table.shares == {} and table.queued == 0 and table.queued_bytes == 0


def test_the_queue_is_bounded_in_bytes_too() -> None:
    table = Table(max_queue=100, max_queue_wait_s=1.0, max_queue_bytes=1000, client_share=1.0)
    table.enqueue(Job(b"a", "1", "m", [b"x" * 600], 0.0))
    assert table.why_not_enqueue(Job(b"b", "2", "m", [b"x" * 600], 0.0)) is not None
    assert table.why_not_enqueue(Job(b"b", "3", "m", [b"x" * 300], 0.0)) is None


def test_jobs_are_indexed_by_client_and_a_cancelled_job_frees_credit_unserved() -> None:
    table = _table_with(3)
    w = table.workers[b"\x00"]
    jobs = [Job(c, r, "m", [], 0.0) for c, r in ((b"a", "1"), (b"a", "2"), (b"b", "1"))]
    for job in jobs:
        table.add(job)
        table.assign(job, w)
    assert table.jobs_of_client(b"a") == jobs[:2]
    jobs[0].cancelled = True
    assert table.jobs_of_client(b"a") == [jobs[1]]
    assert w.free == 0  # a cancel not yet confirmed still holds its credit
    table.finish(jobs[0])
    table.finish(jobs[2])
    assert w.free == 2 and w.served == 1 and set(table.by_client) == {b"a"}


def _routed_table(*caps: int, slack: float = 0.25) -> Table:
    table = Table(max_queue=2, max_queue_wait_s=1.0, routing="prefix", affinity_slack=slack,
                  prefix_index_entries=8)
    for i, cap in enumerate(caps):
        table.register(bytes([i]), {"worker_id": f"w{i}", "models": ["m"], "capacity": cap}, 1e9)
    return table


def _send(table: Table, rid: str, prefix: list[bytes]) -> str:
    worker = table.pick_worker("m", prefix)
    assert worker is not None
    table.assign(Job(b"c", rid, "m", [], 0.0, prefix=prefix), worker)
    return worker.worker_id


def test_prefix_routing_follows_the_longest_match() -> None:
    table = _routed_table(8, 8, 8)
    a, b = _send(table, "a", [b"A1", b"A2"]), _send(table, "b", [b"B1"])
    assert a != b  # cold prefixes go least loaded
    assert _send(table, "a2", [b"A1", b"A2", b"A3"]) == a  # the next turn: same worker
    assert _send(table, "b2", [b"B1", b"B2"]) == b
    assert table.routed == {"affinity": 2, "spilled": 0, "cold": 2}
    # the deepest match wins over a shallower one held elsewhere
    table.index.record([b"X1"], table.find_by_id(b).identity)
    assert _send(table, "mix", [b"X1", b"A1", b"A2", b"A3"]) == a


def test_a_loaded_prefix_worker_spills_to_the_least_loaded() -> None:
    table = _routed_table(8, 8, slack=0.25)  # spill past 2 more in flight than the other
    home = _send(table, "r0", [b"hot"])
    picks = [_send(table, f"r{i}", [b"hot"]) for i in range(1, 6)]
    assert picks[:2] == [home, home] and home not in picks[2:3]  # third: 3 ahead -> spill
    assert table.routed["spilled"] >= 1
    # the spilled copy now owns the prefix: it follows the newest holder
    spilled_to = picks[2]
    assert table.index.owner[b"hot"] == table.find_by_id(spilled_to).identity


def test_full_draining_and_gone_workers_are_never_picked_for_affinity() -> None:
    table = _routed_table(1, 4)
    w0, w1 = table.workers[b"\x00"], table.workers[b"\x01"]
    table.assign(Job(b"c", "x", "m", [], 0.0, prefix=[b"P"]), w0)  # w0 full, holds P
    assert table.pick_worker("m", [b"P"]) is w1
    table.finish(table.jobs.get((b"c", "x")) or w0.inflight[(b"c", "x")])
    w0.draining = True
    assert table.pick_worker("m", [b"P"]) is w1
    w0.draining = False
    table.remove_worker(w0)
    assert b"P" not in table.index.owner and table.pick_worker("m", [b"P"]) is w1


def test_the_prefix_index_stays_bounded() -> None:
    table = _routed_table(1000)
    for i in range(100):
        _send(table, str(i), [f"h{i}-{k}".encode() for k in range(3)])
    assert len(table.index) == 8  # prefix_index_entries
    assert sum(len(s) for s in table.index.held.values()) == 8


def test_least_loaded_routing_ignores_prefixes() -> None:
    table = Table(max_queue=2, max_queue_wait_s=1.0, routing="least-loaded")
    for i in range(2):
        table.register(bytes([i]), {"worker_id": f"w{i}", "models": ["m"], "capacity": 4}, 1e9)
    first = _send(table, "a", [b"P"])
    assert _send(table, "b", [b"P"]) != first and len(table.index) == 0


def test_the_queue_serves_lower_priority_values_first_and_ages_out_every_lane() -> None:
    table = Table(max_queue=10, max_queue_wait_s=1.0)
    jobs = [Job(b"c", f"r{i}", "m", [], float(i), priority=p)
            for i, p in enumerate([5, 0, 5, -1, 0])]
    for job in jobs:
        table.enqueue(job)
    table.register(b"w", {"worker_id": "w", "models": ["m"], "capacity": 3}, 1e9)
    taken = table.dequeue_for(table.workers[b"w"])
    assert [j.rid for j in taken] == ["r3", "r1", "r4"]  # -1, then the 0s oldest first
    # what is left waits in its lane; the oldest of every lane ages out on time
    assert table.next_queue_deadline() == 1.0
    assert [j.rid for j, _, _ in table.expired_jobs(3.5)] == ["r0", "r2"]
    assert table.queues == {} and table.queued == 0


def test_a_queued_job_past_its_deadline_leaves_with_timeout_before_its_wait_ends() -> None:
    from zeroserve import protocol as p

    table = Table(max_queue=10, max_queue_wait_s=60.0)
    soon = Job(b"c", "soon", "m", [], 0.0, expires=0.5)
    later = Job(b"c", "later", "m", [], 0.0, expires=100.0)
    for job in (soon, later):
        table.add(job)
        table.enqueue(job)
    assert table.next_queue_deadline() == 0.5
    assert table.expired_jobs(0.4) == []
    (job, code, message), = table.expired_jobs(0.6)
    assert job is soon and code == p.TIMEOUT and "deadline" in message
    assert table.next_queue_deadline() == 60.0  # later's wait, not its far deadline
    table.register(b"w", {"worker_id": "w", "models": ["m"], "capacity": 1}, 1e9)
    assert table.dequeue_for(table.workers[b"w"]) == [later]
    assert table.next_queue_deadline() is None and table.expired_jobs(200.0) == []
