"""`zeroserve supervise`: run the repo's supervisord.conf in the foreground.

Fills in the ZEROSERVE_* variables the config reads (defaults below; the environment wins),
starts supervisord, starts ZEROSERVE_WORKERS worker slots once the broker is up, and on Ctrl-C
or SIGTERM stops supervisord, which stops every program (workers drain first).
`--render PATH` instead writes the config with those variables filled in, for an ops team's
/etc/supervisor/conf.d, and creates the run directory it names (logs, sockets), and starts
nothing else.
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def environment(run_dir: str | None = None) -> dict[str, str]:
    run = run_dir or os.environ.get("ZEROSERVE_RUN_DIR") or str(REPO / ".run")
    brokers = range(int(os.environ.get("ZEROSERVE_BROKERS") or 2))
    defaults = {
        "ZEROSERVE_RUN_DIR": run,
        "ZEROSERVE_PYTHON": sys.executable,
        "ZEROSERVE_USER": getpass.getuser(),
        "ZEROSERVE_BROKERS": str(len(brokers)),
        # every broker, all active (supervisord.conf binds broker-N on these)
        "ZEROSERVE_FRONTEND": ",".join(f"ipc://{run}/frontend-{i}.sock" for i in brokers),
        "ZEROSERVE_BACKEND": ",".join(f"ipc://{run}/backend-{i}.sock" for i in brokers),
        "ZEROSERVE_ADMIN": f"ipc://{run}/admin-0.sock",  # any broker's: a drain reaches all
        "ZEROSERVE_ENGINE": "llm",
        "ZEROSERVE_MODEL": "tiny",
        "ZEROSERVE_SERVED_NAME": "",
        "ZEROSERVE_DEVICE": "cpu",
        "ZEROSERVE_MAX_WORKERS": str(os.cpu_count() or 1),
        "ZEROSERVE_WORKERS": "1",
        "ZEROSERVE_HEARTBEAT_S": "1.0",
        "ZEROSERVE_HOST": "127.0.0.1",
        "ZEROSERVE_PORT": "8000",
    }
    env = {**defaults, **{k: v for k, v in os.environ.items() if k.startswith("ZEROSERVE_")}}
    if not env["ZEROSERVE_SERVED_NAME"]:
        model = env["ZEROSERVE_MODEL"]
        env["ZEROSERVE_SERVED_NAME"] = Path(model).name if "/" in model else model
    return {**os.environ, **env}


def render(env: dict[str, str], config: str) -> str:
    """The config with every %(ENV_X)s filled in from `env`: a concrete file for
    /etc/supervisor/conf.d (supervisord's own %(process_num)s and the like stay)."""
    def value(m: re.Match) -> str:
        if m.group(1) not in env:
            raise KeyError(f"{config} reads ${m.group(1)}, which is not set")
        return env[m.group(1)].replace("%", "%%")

    return re.sub(r"%\(ENV_(\w+)\)s", value, Path(config).read_text())


def private_dir(run: Path) -> None:
    """The run directory: it holds the ipc endpoints, the logs and supervisord's socket, for
    this user only."""
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    run.chmod(0o700)


def start(env: dict[str, str], config: str | None = None) -> subprocess.Popen:
    private_dir(Path(env["ZEROSERVE_RUN_DIR"]))
    conf = config or str(REPO / "supervisord.conf")
    return subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-c", conf],
                            env=env, start_new_session=True)


def wait_socket(env: dict[str, str], proc: subprocess.Popen, timeout_s: float = 30) -> Any:
    from zeroserve.tooling.ops import supervisor

    sock = os.path.join(env["ZEROSERVE_RUN_DIR"], "supervisor.sock")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"supervisord exited with {proc.returncode}")
        if os.path.exists(sock):
            rpc = supervisor.connect(sock)
            try:
                rpc.supervisor.getState()
                return rpc
            except OSError:
                pass
        time.sleep(0.1)
    raise TimeoutError("supervisord did not open its socket")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="zeroserve supervise", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "supervisord.conf"))
    ap.add_argument("--render", metavar="PATH", default=None,
                    help="write the config with its variables filled in to PATH, and exit")
    args = ap.parse_args(argv)
    if args.render:
        env = environment()
        private_dir(Path(env["ZEROSERVE_RUN_DIR"]))  # the rendered config's logs, sockets
        Path(args.render).write_text(render(env, args.config))
        print(f"wrote {args.render}: start its {environment()['ZEROSERVE_WORKERS']} worker "
              "slot(s) with scripts/scale_workers.py once supervisord runs it")
        return 0
    from zeroserve.client import Client
    from zeroserve.models import PRESETS, ensure_built
    from zeroserve.procs import stop_on_signals
    from zeroserve.tooling.ops.scale import scale

    env = environment()
    if env["ZEROSERVE_ENGINE"] == "llm" and env["ZEROSERVE_MODEL"] in PRESETS:
        ensure_built(env["ZEROSERVE_MODEL"])
    proc = start(env, args.config)
    stopping = stop_on_signals()
    try:
        rpc = wait_socket(env, proc)
        with Client(env["ZEROSERVE_FRONTEND"]) as client:
            scale(rpc, client, int(env["ZEROSERVE_WORKERS"]))
        print(f"zeroserve under supervisord: {env['ZEROSERVE_WORKERS']} worker(s), gateway on "
              f"http://{env['ZEROSERVE_HOST']}:{env['ZEROSERVE_PORT']}; logs in "
              f"{env['ZEROSERVE_RUN_DIR']}. Ctrl-C stops everything.", flush=True)
        while not stopping() and proc.poll() is None:
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(180)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return 0
