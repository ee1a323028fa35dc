"""tooling/ops/status.py without supervisord: the broker's table alone, tok/s as a rate."""

from __future__ import annotations

import subprocess
import sys
import threading

from zeroserve.tooling.ops import status, supervisor

from .conftest import wait_for


def test_status_without_supervisord_shows_the_brokers_workers(pipeline, tiny_model,
                                                              tmp_path) -> None:
    pipeline.start_broker("--heartbeat-interval-s", "1")
    pipeline.start_worker("hand-run", "--model", str(tiny_model), "--served-name", "tiny",
                          "--max-model-len", "256", "--heartbeat-interval-s", "1",
                          "--dtype", "bfloat16", engine="llm")
    pipeline.start_worker("echo-1", "--model", "echo", "--heartbeat-interval-s", "1")
    pipeline.wait_workers(2, timeout_s=120)
    out = subprocess.run([sys.executable, "-m", "zeroserve.tooling.ops.status", "--broker",
                          pipeline.frontend, "--socket", str(tmp_path / "none.sock"),
                          "--window-s", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr  # no traceback without supervisord
    assert "hand-run" in out.stdout and "echo-1" in out.stdout
    rpc = supervisor.connect(str(tmp_path / "none.sock"))
    with pipeline.client() as client:
        busy = threading.Thread(target=lambda: client.generate(
            "tiny", "keep busy", max_tokens=150, ignore_eos=True, timeout_s=60))
        busy.start()
        rows = {r["slot"]: r for r in status.collect(rpc, client, window_s=1.5)}
        busy.join()
        hand_run = next(w for w in client.workers() if w["worker_id"] == "hand-run")
        assert hand_run["stats"]["dtype"] == "bfloat16"  # --dtype

        def idle() -> bool:  # the last heartbeat's counters arrive, then nothing moves
            now = {r["slot"]: r for r in status.collect(rpc, client, window_s=1.2)}
            return now["hand-run"]["tok_s"] == 0

        assert wait_for(idle, 15), "tok/s never fell to 0: a lifetime mean, not a rate"
    assert rows["hand-run"]["model"] == "tiny" and rows["hand-run"]["state"] == "RUNNING"
    assert rows["hand-run"]["tok_s"] > 0  # generating during the window
    assert rows["echo-1"]["restarts"] is None and not rows["echo-1"]["crash_loop"]


def test_supervise_render_writes_a_concrete_config(tmp_path, monkeypatch) -> None:
    import configparser

    monkeypatch.setenv("ZEROSERVE_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("ZEROSERVE_PORT", "8123")
    out = tmp_path / "zeroserve.conf"
    done = subprocess.run([sys.executable, "-m", "zeroserve.tooling.cli", "supervise", "--render",
                           str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "ENV_" not in text and f"{tmp_path}/run/supervisor.sock" in text
    conf = configparser.RawConfigParser()
    conf.read_string(text)
    assert "--port 8123" in conf["program:gateway"]["command"]
    assert "%(process_num)s" in conf["program:worker"]["command"]  # supervisord's own stays
    from supervisor.options import ServerOptions

    # the run directory its logs go to exists (a fresh machine's render failed to parse)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    opts = ServerOptions()  # supervisord itself reads it
    opts.realize(args=["-c", str(out)])
    assert {g.name for g in opts.process_group_configs} >= {"broker", "worker", "gateway"}
