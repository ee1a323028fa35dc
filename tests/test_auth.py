"""CURVE + ZAP over tcp: keyed peers serve; no key, unknown keys and wrong roles are refused."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx
import pytest

from zeroserve import (
    BadRequestError,
    Client,
    RequestTimeoutError,
    UnavailableError,
    ZeroserveError,
)
from zeroserve.keys import KeysError, PeerKeys, generate
from zeroserve.procs import spawn, stop

from .conftest import start_gateway, wait_for


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    for name, role in (("broker", "broker"), ("alice", "client"), ("w1", "worker"),
                       ("w2", "worker"), ("ops", "admin"), ("gateway", "client")):
        generate(d, name, role)
    generate(tmp_path / "other", "mallory", "client")
    generate(tmp_path / "other", "fake-broker", "broker")
    return d


def test_keys_layout_and_refusals(keys, tmp_path) -> None:
    assert (keys / "public" / "client" / "alice.key").is_file()
    secret = keys / "secret" / "alice.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (keys / "secret").stat().st_mode & 0o777 == 0o700
    alice = PeerKeys.load(keys, "alice")
    assert alice.broker == PeerKeys.load(keys, "broker").public != alice.public
    with pytest.raises(KeysError, match="exists"):
        generate(keys, "alice", "client")
    with pytest.raises(KeysError, match="broker key already"):
        generate(keys, "second-broker", "broker")
    secret.chmod(0o644)
    with pytest.raises(KeysError, match="readable by others"):
        PeerKeys.load(keys, "alice")


def test_curve_fabric_on_distinct_loopback_hosts(pipeline, keys, tmp_path) -> None:
    front, back = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
    admin = f"tcp://127.0.0.1:{_port()}"
    pipeline.start_broker("--frontend", front, "--backend", back, "--admin", admin,
                          "--keys", str(keys))
    # two workers on "other hosts": their connections come from 127.0.0.2 and 127.0.0.3
    for name, src in (("w1", "127.0.0.2"), ("w2", "127.0.0.3")):
        pipeline.start_worker(name, "--broker", f"tcp://{src}:0;{back[6:]}", "--keys",
                              str(keys), "--key-name", name)
    # a client key used as a worker: refused at the handshake, never registered
    pipeline.start_worker("imposter", "--broker", back, "--keys", str(keys),
                          "--key-name", "alice")
    with Client(front, keys=PeerKeys.load(keys, "alice"), heartbeat_interval_s=0.25) as c:
        rows = wait_for(lambda: _workers(c, 2), 60)
        assert rows, pipeline.dump_logs()
        assert sorted(r["worker_id"] for r in rows) == ["w1", "w2"]
        assert [c.generate("echo", f"hi {i}", timeout_s=10).text for i in range(4)] == [
            f"hi {i}" for i in range(4)]
        time.sleep(1.0)
        assert sorted(w["worker_id"] for w in c.workers()) == ["w1", "w2"]
    # the gateway is one more keyed client; HTTP callers reach the workers through it
    url = start_gateway(pipeline, "--keys", str(keys), "--key-name", "gateway", broker=front)
    res = httpx.post(f"{url}/v1/completions", json={"model": "echo", "prompt": "over curve",
                                                     "max_tokens": 8}, timeout=10)
    assert res.status_code == 200, res.text
    assert res.json()["choices"][0]["text"] == "over curve"
    ops_keys, alice_keys = PeerKeys.load(keys, "ops"), PeerKeys.load(keys, "alice")
    with (Client(front, keys=ops_keys, heartbeat_interval_s=0.25) as ops,
          pytest.raises(BadRequestError, match="admin endpoint")):  # not on the frontend
        ops.admin("drain", worker_id="w2")
    with (Client(admin, keys=alice_keys, heartbeat_interval_s=0.1) as alice,
          pytest.raises((UnavailableError, RequestTimeoutError))):  # a client key: refused
        alice.admin("drain", worker_id="w2", timeout_s=1.5)
    with Client(admin, keys=PeerKeys.load(keys, "ops"), heartbeat_interval_s=0.25) as ops:
        assert ops.admin("drain", worker_id="w2", timeout_s=10)["draining"] is True
    with Client(front, keys=PeerKeys.load(keys, "alice"), heartbeat_interval_s=0.25) as c:
        assert wait_for(lambda: [w["worker_id"] for w in _workers(c, 1)] == ["w1"], 20)
    refused = {
        "no key": dict(insecure=True),
        "unknown key": dict(keys=PeerKeys.load(tmp_path / "other", "mallory")),
        "a worker key as a client": dict(keys=PeerKeys.load(keys, "w1")),
    }
    for why, kw in refused.items():
        with Client(front, heartbeat_interval_s=0.1, **kw) as c:  # type: ignore[arg-type]
            with pytest.raises((UnavailableError, RequestTimeoutError)):  # nothing answers
                c.generate("echo", "let me in", timeout_s=1.5)
            print("refused:", why)
    assert pipeline.broker.poll() is None


def _workers(c: Client, n: int) -> list:
    try:
        rows = c.workers()
    except ZeroserveError:  # the broker is still starting
        return []
    return rows if len(rows) >= n else []


def test_tcp_without_curve_needs_insecure(tmp_ipc) -> None:
    args = ["--frontend", f"tcp://127.0.0.1:{_port()}", "--backend", f"tcp://127.0.0.1:{_port()}",
            "--admin", f"ipc://{tmp_ipc}/a"]
    proc = spawn("broker", args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and b"without CURVE" in out and b"Traceback" not in out
    proc = spawn("broker", [*args, "--insecure"], stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT)
    try:
        assert b"INSECURE" in proc.stdout.readline() + proc.stdout.readline()
    finally:
        stop(proc)  # SIGTERM, then SIGKILL if it will not go
    with pytest.raises(Exception, match="without CURVE"):
        Client(f"tcp://127.0.0.1:{_port()}")


def test_a_key_folder_others_can_write_to_is_refused(keys, tmp_path) -> None:
    """Whoever can drop a file into public/<role>/ could let themselves in: the broker refuses
    such a key directory at start, with the reason, instead of trusting it."""
    from zeroserve.keys import allowlists

    assert PeerKeys.load(keys, "alice").public in allowlists(keys)["client"]
    (keys / "public" / "worker").chmod(0o777)
    with pytest.raises(KeysError, match="another user could add a key"):
        allowlists(keys)
    ipc = tmp_path / "run"
    ipc.mkdir(mode=0o700)
    proc = spawn("broker", ["--keys", str(keys), "--frontend", f"ipc://{ipc}/f",
                            "--backend", f"ipc://{ipc}/b", "--admin", f"ipc://{ipc}/a"],
                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and b"another user could add a key" in out, out
