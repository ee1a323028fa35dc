"""`zeroserve up` and the CLI: the whole pipeline in one foreground command, Ctrl-C stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import httpx
import psutil

from zeroserve import Client
from zeroserve.tooling.cli import main as cli_main

from .conftest import wait_for


def test_cli_lists_its_commands(capsys) -> None:
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("broker", "worker", "gateway", "up", "bench", "make-model", "supervise"):
        assert f"zeroserve {cmd}" in out
    assert cli_main(["no-such-command"]) == 2


def test_up_serves_sdk_and_http_then_ctrl_c_stops_everything(tmp_ipc, tiny_model) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    frontend, backend = f"ipc://{tmp_ipc}/f.sock", f"ipc://{tmp_ipc}/b.sock"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_ipc)}  # its admin socket: here too
    with open(tmp_ipc / "up.log", "w+b") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zeroserve.tooling.cli", "up", "--model", str(tiny_model),
             "--frontend", frontend, "--backend", backend, "--port", str(port),
             "--worker-flags", "--dtype float32 --scheduling fcfs",
             "--gateway-flags", "--allowed-hosts api.internal"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    children: list[psutil.Process] = []
    try:
        def printed() -> bool:
            return b"Ctrl-C here stops everything" in (tmp_ipc / "up.log").read_bytes()

        assert wait_for(printed, 120, 0.2), (tmp_ipc / "up.log").read_text()
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # broker, worker, gateway
        with Client(frontend) as c:
            model = c.workers()[0]["models"][0]
            assert c.workers()[0]["stats"]["dtype"] == "float32"  # --worker-flags reached it
            assert c.generate(model, "hello", max_tokens=3, timeout_s=30).token_ids
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={
            "host": "api.internal"},  # served only because --gateway-flags allowed it
            json={"model": model, "prompt": "hello", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        # a second `up` on the same endpoints: it starts nothing and says why, and the first
        # goes on serving (its socket files untouched)
        again = subprocess.Popen(
            [sys.executable, "-m", "zeroserve.tooling.cli", "up", "--engine", "echo",
             "--frontend", frontend, "--backend", backend, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            said, _ = again.communicate(timeout=120)
        finally:  # had it hung with children started, they go too (by pid)
            if again.poll() is None:
                for child in [*psutil.Process(again.pid).children(recursive=True),
                              psutil.Process(again.pid)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
            again.wait()
        assert again.returncode == 1 and f"zeroserve already runs at {frontend}" in said, said
        with Client(frontend) as c:
            assert c.generate(model, "still", max_tokens=3, timeout_s=30).token_ids
        # a worker killed -9: up starts it again while the gateway keeps answering
        worker = next(c for c in children if "worker" in c.cmdline())
        worker.kill()
        with Client(frontend) as c:
            def back() -> bool:
                rows = c.workers()
                return bool(rows) and rows[0]["pid"] != worker.pid
            assert wait_for(back, 120, 0.2), (tmp_ipc / "up.log").read_text()
            assert c.generate(model, "again", max_tokens=3, timeout_s=30).token_ids
            assert b"restarting in" in (tmp_ipc / "up.log").read_bytes()
            # Ctrl-C while a generation runs: the worker drains it before anything stops
            chunks = c.submit(model, "last words", max_tokens=64, ignore_eos=True).chunks(60)
            got = list(next(chunks).token_ids)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            for chunk in chunks:
                got += chunk.token_ids
            assert len(got) == 64
        assert proc.wait(60) == 0
        assert wait_for(lambda: not [c for c in children
                                     if c.is_running() and c.status() != "zombie"], 5)
    finally:  # up's children run in process groups of their own: reap them by pid too
        if proc.poll() is None:
            children += psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
