"""Tenants cannot see or steer each other through request ids: two API keys against a real
gateway (gateway/app.py wire ids; the SDK core never overwrites a pending request)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from zeroserve import BadRequestError

from .conftest import start_gateway


def test_the_same_request_id_from_two_keys_streams_both_whole(pipeline, monkeypatch) -> None:
    pipeline.start_broker()
    pipeline.start_worker("echo", "--step-delay-ms", "10")
    pipeline.wait_workers(1)
    monkeypatch.setenv("ZEROSERVE_API_KEYS", "alice:sk-alice,bob:sk-bob")
    url = start_gateway(pipeline)

    async def stream(client: httpx.AsyncClient, key: str, rid: str, n: int,
                     started: asyncio.Event) -> list[str]:
        texts = [""] * n
        async with client.stream("POST", "/v1/completions", headers={
                "authorization": f"Bearer {key}", "x-request-id": rid}, json={
                "model": "echo", "prompt": " ".join([key] * 40), "max_tokens": 40, "n": n,
                "stream": True}, timeout=20) as resp:
            assert resp.status_code == 200
            assert resp.headers["x-request-id"] == rid  # the caller's own id comes back
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    started.set()
                    for choice in json.loads(line[6:])["choices"]:
                        texts[choice["index"]] += choice["text"]
        return texts

    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=url) as client:
            # alice streams under "order-42-c1"; then bob asks for "order-42" with n=2, whose
            # second choice would be "order-42-c1" too if ids were not the gateway's own
            alice_started, bob_started = asyncio.Event(), asyncio.Event()
            alice = asyncio.create_task(stream(client, "sk-alice", "order-42-c1", 1,
                                               alice_started))
            await asyncio.wait_for(alice_started.wait(), 20)
            bob = await stream(client, "sk-bob", "order-42", 2, bob_started)
            return await alice, bob

    alice, bob = asyncio.run(run())
    assert alice == [" ".join(["sk-alice"] * 40)]  # whole: nobody else's request froze it
    assert bob == [" ".join(["sk-bob"] * 40)] * 2


def test_the_sdk_refuses_an_id_already_in_flight(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("echo", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        first = c.submit("echo", "one two three four", request_id="mine")
        with pytest.raises(BadRequestError, match="in flight"):
            c.submit("echo", "another", request_id="mine")
        assert first.result(10).text == "one two three four"  # untouched by the second


def test_a_tenant_sees_only_its_own_cached_prefixes(pipeline, tiny_model, monkeypatch) -> None:
    pipeline.start_broker()
    pipeline.start_worker("llm", "--model", str(tiny_model), "--served-name", "tiny",
                          "--dtype", "float32", engine="llm")
    pipeline.wait_workers(1, timeout_s=120)
    monkeypatch.setenv("ZEROSERVE_API_KEYS", "alice:sk-alice,bob:sk-bob")
    url = start_gateway(pipeline, "--cache-mb", "0")
    secret = "the launch code is " + " ".join(f"w{i}" for i in range(120))

    def cached(key: str, **extra: object) -> int:
        r = httpx.post(f"{url}/v1/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "tiny", "prompt": secret, "max_tokens": 1, **extra},
                       timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)

    assert cached("sk-alice") == 0
    assert cached("sk-alice") > 100  # her own prefix: cached
    assert cached("sk-bob") == 0  # the same prompt under another key: no oracle
    # a salt both name on purpose is shared, and cannot name a key's own salt
    assert cached("sk-alice", cache_salt="team") == 0
    assert cached("sk-bob", cache_salt="team") > 100
    assert cached("sk-bob", cache_salt="alice") == 0
    assert cached("sk-bob", cache_salt="tenant:alice") == 0


def test_prefix_cache_figures_are_for_admin_keys_only(pipeline, tmp_path) -> None:
    pipeline.start_broker()
    pipeline.start_worker("echo")
    pipeline.wait_workers(1)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "alice", "key": "sk-alice"},
                                         {"id": "ops", "key": "sk-ops", "admin": True}]}))
    url = start_gateway(pipeline, "--api-keys-file", str(keys))

    def metrics(key: str) -> str:
        r = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 200
        return r.text

    assert "zeroserve_prefix_cache_hit_ratio" in metrics("sk-ops")
    tenant = metrics("sk-alice")
    assert "prefix_cache" not in tenant and "zeroserve_workers_up" in tenant


def test_per_worker_series_are_bounded() -> None:
    from zeroserve.gateway.metrics import MAX_LABEL_CHARS, MAX_WORKER_SERIES, _worker_families

    workers = [{"worker_id": f"w{i:04d}" + "x" * 500, "models": ["m" * 500],
                "stats": {"running": 1, "steps": 2}} for i in range(MAX_WORKER_SERIES + 100)]
    for family in _worker_families(workers):
        assert len(family.samples) <= MAX_WORKER_SERIES
        for sample in family.samples:
            assert all(len(v) <= MAX_LABEL_CHARS for v in sample.labels.values())


def test_one_tenants_huge_tokenize_calls_do_not_hold_up_another(pipeline, tiny_model) -> None:
    """Tenant a sends two 3 MB /tokenize bodies (each seconds of tokenizer work), then tenant b
    a small generation: b is answered before either of a's, on the thread kept for others."""
    import time

    pipeline.start_broker()
    pipeline.start_worker("llm", "--model", str(tiny_model), "--served-name", "tiny",
                          engine="llm")
    pipeline.wait_workers(1, timeout_s=120)
    import threading

    done: dict[str, float] = {}

    def wait(name: str, handle) -> None:
        with pytest.raises(BadRequestError, match="answers at most"):  # 1.2M tokens
            handle.result(60)
        done[name] = time.monotonic()

    with pipeline.client() as a, pipeline.client() as b:
        big = "word " * 600_000
        waits = [threading.Thread(target=wait, args=(f"a{i}", a.submit(
            "tiny", op="tokenize", prompt=big, tenant="a", resume=False))) for i in range(2)]
        for t in waits:
            t.start()
        time.sleep(0.2)  # both are in preparation
        b.submit("tiny", prompt="hello", max_tokens=2, tenant="b").result(60)
        done["b"] = time.monotonic()
        for t in waits:
            t.join(60)
    assert done["b"] < done["a0"] and done["b"] < done["a1"], done


def test_a_body_of_countless_small_items_is_refused_cheaply(pipeline) -> None:
    """220,000 chat messages in a 7.7 MB body: refused by count (before each is checked and
    sent on), and the gateway answers others meanwhile."""
    from zeroserve.contract import MAX_MESSAGES

    pipeline.start_broker()
    pipeline.start_worker("echo")
    pipeline.wait_workers(1)
    url = start_gateway(pipeline)
    flood = {"model": "echo", "messages": [{"role": "user", "content": "ab"}] * 220_000}
    r = httpx.post(f"{url}/v1/chat/completions", json=flood, timeout=30)
    assert r.status_code == 400 and f"at most {MAX_MESSAGES} items" in r.text
    ok = {"model": "echo", "messages": [{"role": "user", "content": "ab"}] * MAX_MESSAGES}
    r = httpx.post(f"{url}/v1/chat/completions", json=ok, timeout=30)
    assert "items" not in r.text  # the limit itself passes (echo then wants a prompt)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_a_body_of_millions_of_strings_is_refused_and_its_memory_given_back(pipeline) -> None:
    """45 MB of two-character strings (15M of them, some 800 MB as Python objects): the worker
    refuses it by item count, gives the memory back, and serves on."""
    import psutil

    pipeline.start_broker()
    worker = pipeline.start_worker("echo")
    pipeline.wait_workers(1)
    proc = psutil.Process(worker.pid)
    with pipeline.client() as c:
        assert c.generate("echo", "warm up", timeout_s=10).text == "warm up"
        before = proc.memory_info().rss
        with pytest.raises(BadRequestError, match="items"):
            c.submit("echo", "x", junk=[["ab"] * 1_000_000] * 15).result(60)
        grew = proc.memory_info().rss - before
        assert grew < 200 << 20, f"the worker kept {grew >> 20} MiB"
        assert c.generate("echo", "still here", timeout_s=10).text == "still here"


def test_one_key_reusing_an_id_in_flight_gets_409_and_other_keys_never_notice(
        pipeline, monkeypatch) -> None:
    pipeline.start_broker()
    pipeline.start_worker("echo", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    monkeypatch.setenv("ZEROSERVE_API_KEYS", "alice:sk-alice,bob:sk-bob")
    url = start_gateway(pipeline)

    def post(key: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", timeout=30, headers={
            "authorization": f"Bearer {key}", "x-request-id": "dup"}, json={
            "model": "echo", "prompt": "one two three", "max_tokens": 3})

    with httpx.stream("POST", f"{url}/v1/completions", timeout=30, headers={
            "authorization": "Bearer sk-alice", "x-request-id": "dup"}, json={
            "model": "echo", "prompt": " ".join(["w"] * 100), "max_tokens": 100,
            "stream": True}) as long:
        assert long.status_code == 200
        lines = long.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # it is running
        again = post("sk-alice")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "request_id_in_flight"
        assert post("sk-bob").status_code == 200  # another key's same id: no clash, no hint
        assert sum(1 for line in lines if line.startswith("data: {")) > 50
    assert post("sk-alice").status_code == 200  # its first request ended: the id is free


def test_a_key_past_its_body_pace_waits_unread_and_other_keys_do_not(pipeline,
                                                                     monkeypatch) -> None:
    """Key A sends 1.5 MiB bodies back to back on a 2 MiB/s pace: its third waits about a
    second before it is read; key B's small requests meanwhile are answered at once."""
    pipeline.start_broker()
    pipeline.start_worker("echo")
    pipeline.wait_workers(1)
    monkeypatch.setenv("ZEROSERVE_API_KEYS", "a:sk-a,b:sk-b")
    url = start_gateway(pipeline, "--body-mib-per-s", "2")
    big = json.dumps({"model": "echo", "prompt": "x " * (3 << 19), "max_tokens": 1}).encode()

    async def run() -> tuple[list[float], list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            async def a() -> list[float]:
                took = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    res = await http.post("/v1/completions", content=big, headers={
                        "authorization": "Bearer sk-a", "content-type": "application/json"})
                    assert res.status_code == 200, res.text
                    took.append(time.perf_counter() - t0)
                return took

            async def b() -> list[float]:
                await asyncio.sleep(0.3)  # while A's third body waits
                took = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    res = await http.post("/v1/completions", headers={
                        "authorization": "Bearer sk-b"}, json={
                        "model": "echo", "prompt": "small", "max_tokens": 1})
                    assert res.status_code == 200
                    took.append(time.perf_counter() - t0)
                return took

            return await asyncio.gather(a(), b())

    a_took, b_took = asyncio.run(run())
    assert sum(a_took) > 0.9  # 4.5 MiB at 2 MiB/s, the first 2 MiB at once: paced
    assert max(b_took) < 0.5 < sum(a_took)  # B never waited for A's turn


def test_the_body_pace_table_stays_bounded() -> None:
    from zeroserve.gateway.ratelimit import BodyPace

    pace = BodyPace(bytes_per_s=1000)
    pace.MAX_SENDERS = 4
    assert pace.wait_s(b"busy", 3000) == pytest.approx(2.0, abs=0.05)  # 1 s of budget, 2 owed
    assert pace.wait_s(b"quiet", 10) == 0.0
    time.sleep(0.05)  # its bucket is full again
    pace.wait_s(b"c", 10)
    pace.wait_s(b"d", 10)
    pace.wait_s(b"e", 10)  # the table was full: the quiet sender is forgotten, the busy kept
    assert set(pace.senders) == {b"busy", b"c", b"d", b"e"}
    for i in range(50):  # all busy: the oldest go, the table stays bounded
        pace.wait_s(f"client {i}".encode(), 10)
    assert len(pace.senders) <= 4
    assert BodyPace(0).wait_s(b"x", 10**9) == 0.0  # off
