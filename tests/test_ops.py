"""Operations: autoscaling decisions, and the real supervisord config (scale, kill -9, status)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from zeroserve import Client, ZeroserveError
from zeroserve.procs import stop
from zeroserve.tooling.ops import autoscale, status, supervise, supervisor
from zeroserve.tooling.ops.autoscale import Figures, Policy, PolicyState, decide
from zeroserve.tooling.ops.scale import scale

from .conftest import wait_for

# -- autoscale policy on recorded figures -------------------------------------------------


def test_autoscale_waits_for_the_upscale_delay_then_scales_up() -> None:
    policy = Policy(target_ongoing_requests=4, min_workers=1, max_workers=4,
                    upscale_delay_s=5, downscale_delay_s=30)
    state = PolicyState()
    recorded = [(0, 1, 10), (2, 1, 11), (4, 1, 12), (5, 1, 12), (6, 3, 12)]
    decisions = [decide(policy, state, Figures(t, w, o)) for t, w, o in recorded]
    assert decisions == [None, None, None, 3, None]


def test_autoscale_burst_shorter_than_the_delay_changes_nothing() -> None:
    policy = Policy(target_ongoing_requests=4, upscale_delay_s=5, downscale_delay_s=30)
    state = PolicyState()
    recorded = [(0, 1, 2), (1, 1, 30), (3, 1, 30), (4, 1, 2), (20, 1, 3)]
    assert [decide(policy, state, Figures(*f)) for f in recorded] == [None] * 5


def test_autoscale_scales_down_slowly_and_respects_bounds() -> None:
    policy = Policy(target_ongoing_requests=2, min_workers=1, max_workers=3,
                    upscale_delay_s=0, downscale_delay_s=60)
    state = PolicyState()
    assert decide(policy, state, Figures(0, 1, 100)) == 3  # capped at max_workers
    assert decide(policy, state, Figures(1, 3, 0)) is None
    assert decide(policy, state, Figures(59, 3, 0)) is None
    assert decide(policy, state, Figures(61, 3, 0)) == 1  # never below min_workers
    assert autoscale.wanted(policy, Figures(0, 1, 0)) == 1


# -- the real thing: supervisord with the repo's config ----------------------------------


@pytest.fixture
def deployment(tiny_model):
    root = tempfile.mkdtemp(prefix="zs-ops-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = supervise.environment(root)
    env.update(ZEROSERVE_MODEL=str(tiny_model), ZEROSERVE_SERVED_NAME="tiny",
               ZEROSERVE_MAX_WORKERS="3", ZEROSERVE_HEARTBEAT_S="0.25",
               ZEROSERVE_PORT=str(port), ZEROSERVE_RUN_DIR=root)
    os.environ["ZEROSERVE_RUN_DIR"] = root  # status and scale find the socket through it
    proc = supervise.start(env)
    try:
        rpc = supervise.wait_socket(env, proc)
        with Client(env["ZEROSERVE_FRONTEND"], heartbeat_interval_s=0.25) as client:
            assert wait_for(lambda: _answers(client), 30), "the broker never answered"
            yield rpc, client, root
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.environ.pop("ZEROSERVE_RUN_DIR", None)
        shutil.rmtree(root, ignore_errors=True)


def _answers(client: Client) -> bool:
    try:
        client.workers()
        return True
    except ZeroserveError:
        return False


def _pids(rpc) -> dict[int, int]:
    return {s.slot: s.pid for s in supervisor.slots(rpc) if s.up}


def test_scale_1_3_1_under_load_loses_nothing(deployment) -> None:
    rpc, client, _ = deployment
    assert scale(rpc, client, 1)["started"] == [0]
    assert scale(rpc, client, 1) == {"started": [], "stopped": []}  # idempotent
    first_pid = _pids(rpc)[0]
    failures: list[str] = []
    done = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            handles = [client.submit("tiny", "keep going", max_tokens=24, ignore_eos=True,
                                     temperature=0) for _ in range(4)]
            for h in handles:
                try:
                    res = h.result(60)
                    assert len(res.token_ids) == 24, res.token_ids
                    done[0] += 1
                except (ZeroserveError, AssertionError) as exc:
                    failures.append(repr(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        assert scale(rpc, client, 3)["started"] == [1, 2]
        served_3 = wait_for(lambda: all(w["served"] > 0 for w in client.workers()), 30)
        assert served_3, client.workers()
        assert scale(rpc, client, 1)["stopped"] == [1, 2]
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(90)
    assert failures == [] and done[0] > 10
    assert _pids(rpc) == {0: first_pid}  # the remaining worker was never restarted
    assert [w["worker_id"] for w in client.workers()] == ["worker-0"]
    states = {s.slot: s.state for s in supervisor.slots(rpc)}
    assert states[1] in ("STOPPED", "EXITED") and states[2] in ("STOPPED", "EXITED")


def test_kill_9_worker_is_restarted_and_status_matches(deployment) -> None:
    rpc, client, root = deployment
    scale(rpc, client, 2)
    rows = {r["slot"]: r for r in status.collect(rpc, client)}
    broker_pids = {w["worker_id"]: w["pid"] for w in client.workers()}
    assert rows[0]["pid"] == broker_pids["worker-0"] and rows[1]["pid"] == broker_pids["worker-1"]
    assert rows[0]["state"] == "RUNNING" and rows[2]["state"] == "STOPPED"
    assert rows[0]["restarts"] == 0 and rows[0]["model"] == "tiny"
    old = rows[0]["pid"]
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)

    def back() -> bool:
        pids = {w["worker_id"]: w["pid"] for w in client.workers()}
        return pids.get("worker-0") not in (None, old)

    assert wait_for(back, 60, 0.2)
    assert client.generate("tiny", "after the crash", max_tokens=4, timeout_s=30).token_ids
    print(f"kill -9 to serving again: {time.monotonic() - t0:.1f}s")
    row = {r["slot"]: r for r in status.collect(rpc, client)}[0]
    assert row["restarts"] == 1 and row["pid"] != old and not row["crash_loop"]
    assert "RESTARTS" in status.render(status.collect(rpc, client))
    for restarts in (2, 3):  # killed again as soon as it starts: a crash loop
        pid = wait_for(lambda: _pids(rpc).get(0), 30, 0.1)
        os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda n=restarts: supervisor.restarts(0) == n, 60, 0.1)
    rows = status.collect(rpc, client, window_s=0)
    assert rows[0]["crash_loop"] and "<- crash loop?" in status.render(rows)
    assert Path(root, "supervisor.sock").stat().st_mode & 0o077 == 0  # owner only


def test_the_autoscale_loop_reads_the_broker_and_decides(pipeline) -> None:
    import subprocess
    import sys

    pipeline.start_broker("--heartbeat-interval-s", "1")
    pipeline.start_worker("only", "--step-delay-ms", "50", "--heartbeat-interval-s", "1")
    pipeline.wait_workers(1)
    out = pipeline.root / "autoscale.log"
    with pipeline.client() as c, open(out, "wb") as fh:
        handles = [c.submit("echo", " ".join(["w"] * 400)) for _ in range(20)]
        script = Path(__file__).parents[1] / "scripts" / "autoscale.py"  # the README command
        loop = subprocess.Popen([sys.executable, str(script), "--dry-run",
                                 "--broker", pipeline.frontend, "--interval-s", "0.1",
                                 "--upscale-delay-s", "0.3"], stdout=fh, stderr=fh,
                                start_new_session=True)
        pipeline.procs.append(loop)  # reaped with the pipeline, whatever happens here
        try:
            # 20 ongoing, 8 a worker wanted: 3 workers, once the wish has lasted 0.3 s
            assert wait_for(lambda: b"20 ongoing on 1 workers -> 3 workers (dry run)"
                            in out.read_bytes(), 30), out.read_text()
        finally:
            for h in handles:
                h.cancel()
    assert stop(loop, timeout_s=10, sig=signal.SIGINT) == 0  # Ctrl-C: it ends between ticks

