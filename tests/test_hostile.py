"""Hostile input, end to end: generated requests at the gateway's OpenAPI never get a 500, and
10,000 hostile messages at each socket (broker frontend, backend and admin, gateway HTTP) grow
no process by 50 MiB and leave every process serving. A real broker, echo worker and gateway.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import httpx
import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeroserve import protocol as p
from zeroserve.client import Client

from .conftest import Pipeline, start_gateway, wait_for

MIB = 1 << 20
HOSTILE = 10_000


@pytest.fixture(scope="module")
def stack():
    pipe = Pipeline(Path(tempfile.mkdtemp(prefix="zs-hostile-")))
    try:
        # what one client may park in the broker is bounded by these (queue bytes, backlog,
        # the worker's credit): the test looks for growth beyond them, i.e. kept state
        # and the default heartbeats (1 s x 3), not the tests' 0.25 s: a flood that saturates
        # two cores must not pass for a dead worker
        beat = ("--heartbeat-interval-s", "1")
        pipe.start_broker("--client-backlog", "1000", "--max-queue-mb", "16", *beat)
        pipe.start_worker("echo", "--model", "echo", "--capacity", "64", *beat)
        pipe.wait_workers(1)
        pipe.url = start_gateway(pipe)
        yield pipe
    finally:
        pipe.close()


def _from_schema(schema: dict, defs: dict) -> st.SearchStrategy:
    """Values valid for a JSON schema of the subset pydantic writes into OpenAPI (the positive
    cases schemathesis would generate): $ref, anyOf, const, enum, objects, arrays, scalars
    with their bounds."""
    if not isinstance(schema, dict):  # true: anything at all
        return JSON
    if "$ref" in schema:
        return st.deferred(lambda: _from_schema(defs[schema["$ref"].rsplit("/", 1)[1]], defs))
    if "anyOf" in schema:
        return st.one_of([_from_schema(s, defs) for s in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        if not props:
            extra = schema.get("additionalProperties") or {"type": "string"}
            return st.dictionaries(st.text(max_size=10), _from_schema(extra, defs), max_size=4)
        return st.fixed_dictionaries(
            {k: _from_schema(v, defs) for k, v in props.items() if k in required},
            optional={k: _from_schema(v, defs) for k, v in props.items() if k not in required})
    if kind == "array":
        return st.lists(_from_schema(schema.get("items", {}), defs),
                        min_size=schema.get("minItems", 0), max_size=schema.get("maxItems", 6))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0),
                       max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        return st.integers(int(schema.get("minimum", -(2**63))),
                           int(schema.get("maximum", 2**63 - 1)))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1e9))
        return st.floats(low, schema.get("maximum", 1e9),
                         exclude_min="exclusiveMinimum" in schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON


def _schemas(url: str) -> dict[str, st.SearchStrategy]:
    """A strategy for each POST route's request body, from the gateway's own /openapi.json."""
    doc = httpx.get(f"{url}/openapi.json").json()
    defs = doc["components"]["schemas"]
    out = {}
    for path, ops in doc["paths"].items():
        if "post" in ops:
            schema = ops["post"]["requestBody"]["content"]["application/json"]["schema"]
            out[path] = _from_schema(schema, defs)
    return out


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                               max_size=5),
    max_leaves=25,
)


def test_generated_requests_never_get_a_500(stack) -> None:
    schemas = _schemas(stack.url)
    assert set(schemas) == {"/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                            "/v1/responses", "/tokenize", "/detokenize"}
    client = httpx.Client(base_url=stack.url, timeout=30)
    seen: dict[int, int] = {}

    def post(path: str, body: object) -> None:
        resp = client.post(path, content=json.dumps(body),
                           headers={"content-type": "application/json"})
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        assert resp.status_code < 500, (path, body, resp.text)
        if resp.status_code >= 400:
            assert "message" in resp.json()["error"]

    fields = st.sampled_from(["model", "prompt", "messages", "input", "max_tokens", "stop",
                              "seed", "top_k", "stream", "logprobs", "n", "temperature",
                              "stream_options", "encoding_format", "metadata", "user",
                              "tools", "tool_choice", "instructions", "text"])

    @settings(max_examples=400, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data(), path=st.sampled_from(sorted(schemas)), to_echo=st.booleans())
    def valid_shape(data: st.DataObject, path: str, to_echo: bool) -> None:
        body = data.draw(schemas[path])  # schemathesis' positive cases
        if to_echo:
            body["model"] = "echo"
        post(path, body)

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(path=st.sampled_from(sorted(schemas)), body=JSON,
           mix=st.dictionaries(fields, JSON, max_size=5))
    def any_shape(path: str, body: object, mix: dict) -> None:  # and anything at all
        post(path, {"model": "echo", **mix} if isinstance(body, dict) else body)

    valid_shape()
    any_shape()
    client.close()
    assert seen.get(200, 0) > 0 and sum(v for k, v in seen.items() if k >= 400) > 0


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _bomb() -> bytes:
    return b"\xdd" + (p.MAX_CONTAINERS + 10).to_bytes(4, "big") + b"\x90" * (p.MAX_CONTAINERS + 10)


def _frontend_message(rng: random.Random, i: int) -> list[bytes]:
    kind = i % 8
    rid = f"h{i}"
    if kind == 0:
        return [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 5))]
    if kind == 1:
        return p.request(rid, f"model-{rng.randrange(10**9)}", {"prompt": "x"})
    if kind == 2:
        return p.encode(p.REQUEST, {"id": rid, "model": "echo"}, _bomb())
    if kind == 3:
        return p.encode(p.REQUEST, {"id": rid, "model": "echo"}, msgpack.packb(
            {"prompt": rng.choice([7, None, ["a"], {"b": 1}]), "max_tokens": -5}))
    if kind == 4:
        return [p.VERSION, p.REQUEST, msgpack.packb({"id": rid, "model": 5, "tenant": [1]})]
    if kind == 5:
        return p.cancel(rid)
    if kind == 6:
        return [p.VERSION, p.HEARTBEAT, b"\x80", *[b""] * (p.MAX_BUFFERS + 2)]
    return p.admin(rid, rng.choice(["drain", "nope", "workers"]), worker_id="echo")


def _backend_message(rng: random.Random, i: int) -> list[bytes]:
    kind = i % 5
    if kind == 0:
        return [b"", *[rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 4))]]
    if kind == 1:
        return [b"", *p.encode(p.READY, {"worker_id": 7, "models": "x", "capacity": "9"})]
    if kind == 2:
        return [b"", *p.encode(p.READY, {"worker_id": "rogue", "models": [], "capacity": 0})]
    if kind == 3:
        return [rng.randbytes(5), *p.end(f"h{i}", {"finish_reason": "stop"})]
    return [b"", *p.encode(p.DISCONNECT, {"reason": "\x1b[31mforged\nline"})]


def _admin_message(rng: random.Random, i: int) -> list[bytes]:
    if i % 3 == 0:
        return [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(1, 4))]
    if i % 3 == 1:
        return p.admin(f"a{i}", "drain", worker_id=f"nobody-{i}")
    return [p.VERSION, p.ADMIN, _bomb()]


def _flood(ctx: zmq.Context, endpoint: str, make, n: int) -> int:
    """Send n hostile messages, reading whatever comes back as it goes; return replies read."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    rng, replies = random.Random(endpoint), 0
    for i in range(n):
        sock.send_multipart(make(rng, i))
        while sock.poll(0):
            sock.recv_multipart()
            replies += 1
    while sock.poll(500):
        sock.recv_multipart()
        replies += 1
    sock.close()
    return replies


async def _http_flood(url: str, n: int) -> dict[int, int]:
    rng = random.Random(1)
    bodies = [
        b"{", b"[]", b"null", b'{"model": "echo"}', b'{"model": "echo", "prompt": 5}',
        b'{"model": "echo", "prompt": "x", "seed": 18446744073709551616}',
        b'{"model": "echo", "prompt": "x", "top_k": 99999999999}',
        b'{"model": "echo", "prompt": "x", "tools": [{}]}',
        b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "n": 5}',
        b'{"model": "echo", "input": ["x"], "encoding_format": "hex"}',
    ]
    paths = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
    seen: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def one(i: int) -> None:
            if i % 10 == 9:
                resp = await client.get(f"/no/such/{rng.randrange(10**9)}")
            else:
                resp = await client.post(rng.choice(paths), content=rng.choice(bodies),
                                         headers={"content-type": "application/json"})
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1

        for start in range(0, n, 16):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 16))))
    return seen


def test_10000_hostile_messages_at_each_socket_leave_every_process_serving(stack, ctx) -> None:
    procs = {"broker": stack.broker, "worker": stack.workers["echo"],
             "gateway": next(pr for pr in stack.procs if pr not in (
                 stack.broker, stack.workers["echo"]))}
    floods = [(stack.frontend, _frontend_message), (stack.backend, _backend_message),
              (stack.admin, _admin_message)]
    with Client(stack.frontend) as c:
        def settled() -> bool:  # nothing queued or running: what is left is kept state
            return wait_for(lambda: c.admin("stats")["queued"] == 0
                            and c.workers()[0]["in_flight"] == 0, 20)

        # warm up (allocator pools, caches, first-use imports: the high-water mark a process
        # keeps after a burst), so that what grows after it is state that stays
        for endpoint, make in floods:
            _flood(ctx, endpoint, make, HOSTILE // 4)
        asyncio.run(_http_flood(stack.url, HOSTILE // 10))
        assert settled()
        time.sleep(2.5)
        before = {name: _rss(pr.pid) for name, pr in procs.items()}

        replies = {endpoint: _flood(ctx, endpoint, make, HOSTILE) for endpoint, make in floods}
        statuses = asyncio.run(_http_flood(stack.url, HOSTILE))
        assert settled()
        time.sleep(2.5)  # past the broker's next heartbeat tick, which trims its heap

    grown = {name: (_rss(pr.pid) - before[name]) / MIB for name, pr in procs.items()}
    print(f"RSS growth after {HOSTILE} hostile messages per socket, MiB: {grown}")
    assert all(g < 50 for g in grown.values()), grown
    assert all(pr.poll() is None for pr in procs.values()), stack.dump_logs()
    assert replies[stack.frontend] > HOSTILE // 2  # answered (ERRORs), not silently eaten
    assert 500 not in statuses and sum(statuses.values()) == HOSTILE, statuses
    with Client(stack.frontend) as c:
        assert c.generate("echo", "still serving", timeout_s=10).text == "still serving"
        assert [w["worker_id"] for w in c.workers()] == ["echo"]  # no rogue registered
        assert c.admin("stats")["queued"] == 0
    with Client(stack.admin) as admin:
        assert admin.admin("workers")["live_workers"] == 1
    resp = httpx.post(f"{stack.url}/v1/completions", json={"model": "echo", "prompt": "a b"})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"].split() == ["a", "b"]
