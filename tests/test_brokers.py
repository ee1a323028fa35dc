"""No single broker: two brokers active at once, workers registered with both, clients spread
over both (zeroserve/brokers.py, workers/links.py), and what happens when one dies or hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from zeroserve import AsyncClient, Client
from zeroserve.brokers import Brokers
from zeroserve.config import ClientConfig

from .conftest import WORDS, Pipeline, echo_streams, wait_for


def test_picks_spread_over_live_brokers_and_a_prefix_sticks_to_one() -> None:
    brokers = Brokers(ClientConfig(("a", "b", "c"), heartbeat_interval_s=0.1))
    now = time.monotonic()
    assert {brokers.pick([], now) for _ in range(6)} == {0, 1, 2}
    conversation = [b"\x00\x00\x00\x07first", b"deeper"]
    assert {brokers.pick(conversation, now) for _ in range(5)} == {7 % 3}
    brokers.disconnected(1)
    assert brokers.lost(now) == [1]  # once: it gets a grace period to reconnect
    assert brokers.other(0, now) == 2  # lost and not heard from since: not where to go
    assert brokers.lost(now) == []
    brokers.all[1].expiry = 0.0
    assert 1 not in {brokers.pick([], now) for _ in range(6)}
    assert brokers.other(0, now) == 2
    assert not brokers.new_epoch(0, "e1") and not brokers.new_epoch(0, "e1")
    assert brokers.new_epoch(0, "e2")  # a restarted process


class Two:
    """Two brokers (and their pipelines' files) in one temp dir."""

    def __init__(self, pipeline: Pipeline) -> None:
        root = pipeline.root
        self.pipe = pipeline
        self.fronts = [f"ipc://{root}/f{i}.sock" for i in range(2)]
        self.backs = [f"ipc://{root}/b{i}.sock" for i in range(2)]
        self.admins = [f"ipc://{root}/a{i}.sock" for i in range(2)]
        self.brokers = [self.start(i) for i in range(2)]

    def start(self, i: int):
        return self.pipe.spawn("broker", f"broker{i}", [
            "--frontend", self.fronts[i], "--backend", self.backs[i], "--admin", self.admins[i],
            "--heartbeat-interval-s", "0.25"])

    def worker(self, name: str, *args: str) -> None:
        self.pipe.spawn("worker", name, [
            "--broker", ",".join(self.backs), "--worker-id", name, "--no-pin",
            "--heartbeat-interval-s", "0.25", *args])

    def table(self, i: int) -> list[dict]:
        with Client(self.fronts[i], heartbeat_interval_s=0.25) as c:
            try:
                return c.workers()
            except Exception:
                return []

    def wait_registered(self, names: set[str]) -> None:
        for i in range(2):
            assert wait_for(lambda i=i: names <= {w["worker_id"] for w in self.table(i)}, 60), \
                self.pipe.dump_logs()


@pytest.fixture
def two(pipeline) -> Two:
    t = Two(pipeline)
    for name in ("e1", "e2"):
        t.worker(name, "--capacity", "64", "--step-delay-ms", "20")
    t.wait_registered({"e1", "e2"})
    return t


def test_each_worker_shares_its_capacity_between_its_brokers(two) -> None:
    for i in range(2):
        assert wait_for(lambda i=i: {w["capacity"] for w in two.table(i)} == {32}, 10)
    os.kill(two.brokers[1].pid, signal.SIGKILL)
    # the survivor gets the whole worker: nothing of its capacity is left idle
    assert wait_for(lambda: {w["capacity"] for w in two.table(0)} == {64}, 10)


def test_kill_9_of_one_of_two_brokers_loses_nothing(two) -> None:
    async def fault(_: AsyncClient) -> None:
        os.kill(two.brokers[0].pid, signal.SIGKILL)

    texts, pause = asyncio.run(echo_streams(",".join(two.fronts), 24, fault))
    assert texts == [f"s{i} {WORDS}" for i in range(24)], two.pipe.dump_logs()
    assert pause < 1.0, pause  # a local broker's exit is seen at once: no silence to wait out


def test_a_hung_broker_is_routed_around_and_rejoins_without_duplicates(two) -> None:
    async def fault(_: AsyncClient) -> None:
        os.kill(two.brokers[1].pid, signal.SIGSTOP)
        await asyncio.sleep(2.0)
        os.kill(two.brokers[1].pid, signal.SIGCONT)

    texts, pause = asyncio.run(echo_streams(",".join(two.fronts), 24, fault))
    assert texts == [f"s{i} {WORDS}" for i in range(24)], two.pipe.dump_logs()  # once each
    assert pause < 2.0, pause  # silence past 3 x 0.25 s: its streams moved
    two.wait_registered({"e1", "e2"})  # and it serves again
    with Client(two.fronts[1], heartbeat_interval_s=0.25) as c:
        assert c.generate("echo", "back again", timeout_s=10).text == "back again"


def test_a_drain_through_one_broker_reaches_the_worker_once_and_both_brokers(two) -> None:
    with Client(two.admins[0], heartbeat_interval_s=0.25) as admin:
        admin.admin("drain", worker_id="e1")
    for i in range(2):  # the worker told the other broker itself, then left both
        assert wait_for(lambda i=i: {w["worker_id"] for w in two.table(i)} == {"e2"}, 10)
    logs = two.pipe.dump_logs()
    assert logs.count("draining: broker asked") == 1
