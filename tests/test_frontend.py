"""The broker's frontend under clients that read slowly, hog the queue or leave mid-stream
(broker/frontend.py, broker/outbox.py): a real broker and echo workers over ipc."""

from __future__ import annotations

import collections
import time

import pytest
import zmq

from zeroserve import BusyError
from zeroserve import protocol as p

from .conftest import wait_for


def _slow_reader(pipeline, ctx, hwm: int) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.connect(pipeline.frontend)
    return sock


def _beating(sock: zmq.Socket, until, timeout_s: float) -> bool:
    """Wait for `until()` while the socket reads nothing but says it is alive (HEARTBEATs):
    a slow reader, not a silent one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.send_multipart(p.encode(p.HEARTBEAT, {}))
        if until():
            return True
        time.sleep(0.1)
    return False


def _read_all(sock: zmq.Socket, timeout_s: float = 20.0) -> dict[str, list[p.Message]]:
    """Every reply the socket gets until it stays quiet for a second, by request id."""
    out: dict[str, list[p.Message]] = {}
    deadline = time.monotonic() + timeout_s
    n = 0
    while time.monotonic() < deadline and sock.poll(1000):
        msg = p.decode(sock.recv_multipart())
        if msg.type != p.HEARTBEAT:
            out.setdefault(msg.id, []).append(msg)
        n += 1
        if n % 100 == 0:
            sock.send_multipart(p.encode(p.HEARTBEAT, {}))
    return out


def test_a_slow_reader_gets_every_message_once_it_reads(pipeline, ctx) -> None:
    # Before: one EAGAIN towards a client cancelled all of its requests.
    pipeline.start_broker("--hwm", "20", "--client-backlog", "100000")
    pipeline.start_worker("a")
    pipeline.wait_workers(1)
    sock = _slow_reader(pipeline, ctx, 20)
    words = 20_000
    sock.send_multipart(p.request("long", "echo", {"prompt": " ".join(["w"] * words)}))
    with pipeline.client() as c:
        assert _beating(sock, lambda: c.admin("stats")["backlogged"] > 1000, 10)  # behind
        msgs = _read_all(sock)["long"]
        assert msgs[-1].type == p.END, (msgs[-1].header, len(msgs))
        ids = [i for m in msgs for i in p.body(m).get("token_ids", [])]
        assert ids == list(range(words))  # nothing lost, nothing twice, in order
        assert c.admin("stats")["slow_clients"] == 0 and c.workers()[0]["in_flight"] == 0


def test_a_reader_too_slow_is_cut_off_alone_and_credit_returns_on_confirm(pipeline, ctx) -> None:
    pipeline.start_broker("--hwm", "10", "--client-backlog", "50")
    pipeline.start_worker("a", "--capacity", "8", "--step-delay-ms", "2")
    pipeline.wait_workers(1)
    sock = _slow_reader(pipeline, ctx, 10)
    rids = [f"slow-{i}" for i in range(4)]
    for rid in rids:
        sock.send_multipart(p.request(rid, "echo", {"prompt": " ".join(["w"] * 5000)}))
    with pipeline.client() as c:
        live = c.submit("echo", " ".join(["v"] * 300))  # a normal client beside it
        assert _beating(sock, lambda: c.admin("stats")["slow_clients"] == 1, 20)
        assert live.result(20).token_ids == list(range(300))
        assert wait_for(lambda: c.workers()[0]["in_flight"] == 0, 10)
        assert c.workers()[0]["served"] == 1  # the cancelled streams are not counted served
        got = _read_all(sock)
        for rid in rids:  # each learns why, once it reads again
            last = got[rid][-1]
            assert last.type == p.ERROR and last.header["code"] == p.UNAVAILABLE
            assert "fell 50 messages behind" in last.header["message"]


def test_one_client_cannot_make_the_others_busy(pipeline, ctx) -> None:
    pipeline.start_broker("--max-queue", "8", "--client-share", "0.5")
    pipeline.start_worker("a", "--capacity", "1", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    hog = ctx.socket(zmq.DEALER)
    hog.connect(pipeline.frontend)
    for i in range(6):  # one runs, four wait (half the queue), the sixth is refused
        hog.send_multipart(p.request(f"h{i}", "echo", {"prompt": "a b c"}))
    refused = p.decode(hog.recv_multipart())
    assert refused.id == "h5" and refused.header["code"] == p.BUSY
    assert "client's share" in refused.header["message"]
    with pipeline.client() as c:
        assert c.generate("echo", "my turn", timeout_s=10).text == "my turn"
        hog.send_multipart(p.encode(p.DISCONNECT, {}))
        hog.close(0)
        try:
            c.generate("echo", "x", timeout_s=10)
        except BusyError:  # pragma: no cover - the assertion message says what broke
            raise AssertionError("a client was refused while another held the queue") from None


def test_a_request_resent_while_its_cancel_is_pending_runs_after_it(pipeline, ctx) -> None:
    # The broker gives up on a silent client and cancels its stream; the worker confirms
    # only at its next step. The client, alive after all, resends the same request id at
    # once: it must run after the cancel, not be refused as "in flight" or run twice.
    pipeline.start_broker("--heartbeat-interval-s", "0.25", "--heartbeat-liveness", "2")
    pipeline.start_worker("a", "--step-delay-ms", "400")
    pipeline.wait_workers(1)
    sock = ctx.socket(zmq.DEALER)
    sock.connect(pipeline.frontend)
    body = {"prompt": " ".join(["t"] * 6)}
    sock.send_multipart(p.request("r", "echo", body))
    msg = p.decode(sock.recv_multipart())  # silent (no heartbeats): dropped with a reason
    while msg.type == p.CHUNK:
        msg = p.decode(sock.recv_multipart())
    assert msg.type == p.ERROR and msg.header["code"] == p.UNAVAILABLE
    sock.send_multipart(p.request("r", "echo", body))  # before the worker's next step
    ids: list[int] = []
    while True:
        sock.send_multipart(p.encode(p.HEARTBEAT, {}))
        msg = p.decode(sock.recv_multipart())
        if msg.type == p.HEARTBEAT:
            continue
        assert msg.type in (p.CHUNK, p.END), msg.header
        ids += p.body(msg).get("token_ids", [])
        if msg.type == p.END:
            break
    assert ids == list(range(6))
    with pipeline.client() as c:
        assert wait_for(lambda: c.workers()[0]["in_flight"] == 0, 5)


@pytest.mark.timeout(180)
# a broker --hwm of 50 fills its backend pipe too: the requests wait in its backlog to the worker
def test_the_gateway_carries_200_streams_past_a_small_high_water_mark(pipeline) -> None:
    # One DEALER carries every HTTP stream of a gateway process: with a broker high-water
    # mark of 50 messages its replies must back up in the broker, not cancel its requests.
    import asyncio
    import json

    import httpx

    from .conftest import start_gateway

    # heartbeats as deployed (1 s x 3 everywhere; the gateway's SDK beats once a second)
    beat = ("--heartbeat-interval-s", "1")
    pipeline.start_broker("--hwm", "50", *beat)
    # one CHUNK per token (CHUNKS would carry a step in one message: nothing would back up)
    pipeline.start_worker("a", "--capacity", "256", "--step-delay-ms", "5", "--no-coalesce",
                          *beat)
    pipeline.wait_workers(1)
    url = start_gateway(pipeline)

    async def stream(client: httpx.AsyncClient, i: int) -> str:
        text = ""
        async with client.stream("POST", "/v1/completions", json={
                "model": "echo", "prompt": " ".join([f"s{i}"] * 60), "max_tokens": 60,
                "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def run() -> list[str]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(200)))

    texts = asyncio.run(run())
    assert [t.split() for t in texts] == [[f"s{i}"] * 60 for i in range(200)]
    with pipeline.client() as c:
        stats = c.admin("stats")
        assert stats["backlogged"] > 0, "the gateway never fell behind: the test proves nothing"
        assert stats["slow_clients"] == 0 and stats["lost"] == 0, stats


def test_a_cut_drops_only_the_cancelled_requests_chunks(ctx) -> None:
    # A request that finished while its client was behind keeps every part of its reply: a
    # cut that dropped its CHUNKs but kept its END passed a shortened answer off as whole.
    from zeroserve.broker.outbox import Outbox, Sent

    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 10)
    router.bind("inproc://outbox-cut")  # no kernel buffers: the high-water marks are all
    reader = ctx.socket(zmq.DEALER)
    reader.setsockopt(zmq.RCVHWM, 10)
    reader.setsockopt(zmq.ROUTING_ID, b"c")
    reader.connect("inproc://outbox-cut")
    reader.send(b"hello")  # the router knows the reader once this arrives
    assert router.poll(5000)
    router.recv_multipart()
    outbox = Outbox(router, limit=100_000)
    sent = [outbox.send(b"c", p.chunk(rid, {"text": f"{rid}{i} "})) for i in range(300)
            for rid in ("done", "gone")]
    assert Sent.QUEUED in sent  # the reader fell behind: the rest waits in the backlog
    outbox.send(b"c", p.end("done", {"finish_reason": "length"}))
    outbox.cut(b"c", {"gone"}, [p.error("gone", p.UNAVAILABLE, "cut")])
    got: dict[str, str] = {"done": "", "gone": ""}
    ends = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        outbox.flush()  # as the broker's loop does, every few milliseconds
        if not reader.poll(20):
            if not outbox.backlog:
                break
            continue
        msg = p.decode(reader.recv_multipart())
        if msg.type == p.CHUNK:
            got[msg.id] += p.body(msg)["text"]
        else:
            ends.append((msg.id, p.TYPE_NAMES[msg.type]))
    assert got["done"] == "".join(f"done{i} " for i in range(300))  # nothing of it lost
    assert len(got["gone"]) < len("".join(f"gone{i} " for i in range(300)))
    assert ends == [("done", "END"), ("gone", "ERROR")]


def test_a_cut_drops_chunks_messages_only_of_cancelled_requests(ctx) -> None:
    from zeroserve.broker.outbox import Outbox

    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("inproc://outbox-cut-chunks")
    reader = ctx.socket(zmq.DEALER)
    reader.setsockopt(zmq.ROUTING_ID, b"c")
    reader.connect("inproc://outbox-cut-chunks")
    reader.send(b"hello")  # the router knows the reader once this arrives
    assert router.poll(5000)
    router.recv_multipart()
    outbox = Outbox(router, limit=100)
    only_gone = p.chunks(["gone", "gone2"], [{"text": "a"}, {"text": "b"}])
    mixed = p.chunks(["done", "gone"], [{"text": "c"}, {"text": "d"}])
    outbox.backlog[b"c"] = collections.deque([only_gone, mixed, p.chunk("gone", {})])
    outbox.cut(b"c", {"gone", "gone2"}, [p.error("gone", p.UNAVAILABLE, "cut")])
    got = [reader.recv_multipart() for _ in range(2)]
    assert got[0] == mixed and p.decode(got[1]).type == p.ERROR  # only_gone was dropped
    assert not reader.poll(100)
