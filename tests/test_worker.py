"""Worker runtime: pinning, the echo engine, drain on SIGTERM, engine failures."""

from __future__ import annotations

import os
import signal
import time

import pytest

from zeroserve import BadRequestError, InternalError
from zeroserve.workers import pinning
from zeroserve.workers.echo import EchoEngine
from zeroserve.workers.engine import EngineError

from .conftest import wait_for


def test_parse_cpus() -> None:
    assert pinning.parse_cpus("0-3,8") == (0, 1, 2, 3, 8)
    assert pinning.parse_cpus("2,1,1") == (1, 2)
    for bad in ("", "3-1", "a"):
        with pytest.raises(ValueError):
            pinning.parse_cpus(bad)


def test_partition_splits_cores_evenly_and_shares_when_few() -> None:
    cores = tuple(range(8))
    parts = [pinning.partition(i, 3, cores) for i in range(3)]
    assert parts == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert [pinning.partition(i, 4, (0, 1)) for i in range(4)] == [(0,), (1,), (0,), (1,)]


def test_a_worker_that_may_share_its_cores_waits_passively(monkeypatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert not pinning.wait_passively_if_shared(pinned=True, slots=1)
    assert "OMP_WAIT_POLICY" not in os.environ  # its own cores: spinning is the fast wait
    cores = len(os.sched_getaffinity(0))
    assert pinning.wait_passively_if_shared(pinned=True, slots=cores + 1)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the operator's word stands
    assert not pinning.wait_passively_if_shared(pinned=False, slots=1)
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert pinning.wait_passively_if_shared(pinned=False, slots=1)


def test_torch_steps_on_a_core_fewer_while_text_work_is_heavy() -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cores = pinning.CoreShare()
        cores.update(False)
        assert torch.get_num_threads() == 2
        cores.update(True)  # a prepare thread tokenizes megabytes on one of the cores
        assert torch.get_num_threads() == 1 and cores.narrow
        cores.update(True)
        assert torch.get_num_threads() == 1
        cores.update(False)
        assert torch.get_num_threads() == 2 and not cores.narrow
        torch.set_num_threads(1)
        one = pinning.CoreShare()
        one.update(True)  # one core: nothing to give
        assert torch.get_num_threads() == 1 and not one.narrow
    finally:
        torch.set_num_threads(before)


def test_echo_engine_streams_one_token_per_step() -> None:
    eng = EchoEngine(step_delay_ms=0)
    eng.add((b"c", "1"), {"prompt": "a b c"}, [])
    eng.add((b"c", "2"), {"prompt": "x"}, [])
    first = eng.step()
    assert [o.delta["text"] for o in first] == ["a", "x"]
    assert first[1].finish["finish_reason"] == "length"
    texts = [o.delta["text"] for _ in range(2) for o in eng.step()]
    assert texts == [" b", " c"] and not eng.has_work()
    with pytest.raises(EngineError):
        eng.add((b"c", "3"), {"prompt": 5}, [])


def test_sigterm_drains_in_flight_then_exits_zero(pipeline) -> None:
    pipeline.start_broker()
    worker = pipeline.start_worker("a", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        h = c.submit("echo", " ".join(["t"] * 30))
        chunks = h.chunks(10)
        ids = list(next(chunks).token_ids)
        os.kill(worker.pid, signal.SIGTERM)
        ids += [i for ch in chunks for i in ch.token_ids]
        assert ids == list(range(30))
        assert worker.wait(10) == 0
        deadline = time.monotonic() + 3
        while c.workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.workers() == []


def test_engine_exception_fails_requests_with_internal_and_worker_stays_up(pipeline) -> None:
    pipeline.start_broker()
    worker = pipeline.start_worker("a")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        with pytest.raises(InternalError, match="fail at token 1"):
            c.submit("echo", "a b c", fail_at=1).result(5)  # echo's own field: submit
        with pytest.raises(BadRequestError):
            c.generate("echo", None, timeout_s=5)  # no prompt
        assert c.generate("echo", "fine", timeout_s=5).text == "fine"
    assert worker.poll() is None


def test_repeated_engine_failure_is_fatal_and_announced(pipeline) -> None:
    pipeline.start_broker()
    worker = pipeline.start_worker("a")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        for _ in range(5):
            with pytest.raises(InternalError):
                c.submit("echo", "a b", fail_at=0).result(5)
        assert worker.wait(10) == 1
        assert c.workers() == []  # the dead notice removed it at once


def test_request_id_is_logged_at_every_hop(pipeline) -> None:
    pipeline.start_broker("--log-level", "DEBUG")
    pipeline.start_worker("a", "--log-level", "DEBUG")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        assert c.submit("echo", "traced", request_id="trace-7f3a").result(5).text == "traced"
    assert wait_for(lambda: "request trace-7f3a finished" in pipeline.logs[1].read_text(), 5)
    broker_log, worker_log = (p.read_text() for p in pipeline.logs[:2])
    assert "request trace-7f3a model=echo -> worker a" in broker_log
    assert "request trace-7f3a accepted" in worker_log
    assert "request trace-7f3a finished" in worker_log


def test_text_work_runs_beside_the_engine_and_honours_cancels(pipeline, tiny_model) -> None:
    """While one request's prepare (template + tokenization) is unfinished, running streams
    advance and finish, and a later small request is served; a request cancelled during its
    prepare ends as cancelled and is never run."""
    import threading

    from zeroserve.config import LLMConfig, WorkerConfig
    from zeroserve.workers.llm.engine import LLMEngine
    from zeroserve.workers.runtime import Worker

    pipeline.start_broker()
    pipeline.wait_broker()  # a worker that beats the broker's bind reconnects: keep it simple
    cfg = WorkerConfig(broker=pipeline.backend, model=str(tiny_model),
                       engine=LLMConfig(max_num_seqs=8, max_model_len=256),
                       worker_id="w", dtype="float32", heartbeat_interval_s=0.25)
    engine = LLMEngine.from_config(cfg)
    gates = {"BIG": threading.Event(), "STALL": threading.Event(), "HOLD": threading.Event()}
    real_prepare = engine.prepare

    def prepare(body):  # text work that lasts until the test says so
        gate = gates.get(body.get("prompt", "").split(" ")[0])
        if gate is not None:
            gate.wait(30)
        return real_prepare(body)

    engine.prepare = prepare  # type: ignore[method-assign]
    worker = Worker(cfg, engine)
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        pipeline.wait_workers(1)
        with pipeline.client() as c:
            model = engine.models[0]
            streams = [c.submit(model, f"stream {i}", max_tokens=40, ignore_eos=True)
                       for i in range(4)]
            chunks = [h.chunks(30) for h in streams]
            counts = [len(next(it).token_ids) for it in chunks]  # all four are running
            big = c.submit(model, "BIG " + "word " * 40, max_tokens=4)
            late = c.submit(model, "a late small one", max_tokens=3, ignore_eos=True)
            for it, n in zip(chunks, counts, strict=True):  # BIG's prepare is still blocked
                assert n + sum(len(ch.token_ids) for ch in it) == 40
            assert len(late.result(10).token_ids) == 3
            assert not big.sink.done
            gates["BIG"].set()
            assert big.result(30).finish_reason in ("length", "stop")

            stalled = c.submit(model, "STALL here", max_tokens=4)
            assert wait_for(lambda: worker.preparing, 5)
            stalled.cancel()
            assert wait_for(lambda: worker.cancelled_early, 5)
            gates["STALL"].set()
            with pytest.raises(Exception, match="(?i)cancel"):
                stalled.result(10)
            assert wait_for(lambda: c.workers()[0]["in_flight"] == 0, 5)
            assert not engine.seqs and not worker.preparing and not worker.cancelled_early

            held = c.submit(model, "HOLD on", max_tokens=3, ignore_eos=True)
            assert wait_for(lambda: worker.preparing, 5)
            worker.drain()  # SIGTERM while a request is still being prepared: it is not lost
            assert wait_for(lambda: c.workers()[0]["draining"], 5)
            gates["HOLD"].set()
            assert len(held.result(10).token_ids) == 3
            runner.join(10)
            assert not runner.is_alive()
    finally:
        for gate in gates.values():
            gate.set()
        worker.drain()
        runner.join(10)


def test_a_body_of_too_many_containers_is_a_bad_request(pipeline) -> None:
    pipeline.start_broker()
    worker = pipeline.start_worker("a")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        with pytest.raises(BadRequestError, match="arrays and maps"):
            c.submit("echo", "x", junk=[[]] * 70_000).result(10)
        assert c.generate("echo", "still here", timeout_s=10).text == "still here"
    assert worker.poll() is None


def test_a_worker_pins_itself_to_its_cores_and_reports_them(pipeline) -> None:
    import psutil

    pipeline.start_broker()
    cpu = max(psutil.Process().cpu_affinity())  # a core this machine lets us use
    proc = pipeline.spawn("worker", "pinned", [  # without the fixture's --no-pin
        "--broker", pipeline.backend, "--worker-id", "pinned", "--cpus", str(cpu)])
    rows = pipeline.wait_workers(1)
    assert rows[0]["cpus"] == [cpu]
    assert psutil.Process(proc.pid).cpu_affinity() == [cpu]
    threads = psutil.Process(proc.pid).threads()  # the IO thread and the engine loop too
    assert all(os.sched_getaffinity(t.id) == {cpu} for t in threads)
