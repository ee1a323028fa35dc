"""A broker that dies and comes back on the same endpoints costs its clients a pause, not a
hang: its heartbeats carry a new epoch, the SDK sends everything again marked `again`, and
generations resume from what they had received (client_core.py, broker/frontend.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import zmq

from zeroserve import AsyncClient
from zeroserve import protocol as p

from .conftest import WORDS, Pipeline, echo_streams, wait_for


def _beat_epoch(sock: zmq.Socket) -> str:
    sock.send_multipart(p.encode(p.HEARTBEAT, {}))
    assert sock.poll(5000), "no heartbeat echo"
    msg = p.decode(sock.recv_multipart())
    assert msg.type == p.HEARTBEAT
    return msg.header["epoch"]


def _restart_broker(pipeline: Pipeline) -> None:
    assert pipeline.broker is not None
    os.kill(pipeline.broker.pid, signal.SIGKILL)
    pipeline.broker.wait()
    pipeline.start_broker()


def test_each_broker_process_heartbeats_an_epoch_of_its_own(pipeline, ctx) -> None:
    pipeline.start_broker()
    pipeline.wait_broker()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pipeline.frontend)
    first = _beat_epoch(sock)
    assert _beat_epoch(sock) == first  # one process, one epoch
    _restart_broker(pipeline)
    pipeline.wait_broker()
    second = wait_for(lambda: _beat_epoch(sock), 10)
    assert len(first) == 16 and second != first


def test_a_copy_marked_again_of_a_running_request_is_not_run_twice(pipeline, ctx) -> None:
    pipeline.start_broker()
    pipeline.start_worker("a", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pipeline.frontend)
    frames = p.request("r1", "echo", {"prompt": "one two three four five six"})
    sock.send_multipart(frames)
    sock.send_multipart(p.again(frames))  # ignored: r1 runs already
    sock.send_multipart(frames)  # a plain duplicate is still refused by name
    seen: list[p.Message] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(m.type == p.END for m in seen):
        if sock.poll(200):
            seen.append(p.decode(sock.recv_multipart()))
    errors = [m for m in seen if m.type == p.ERROR]
    assert [m.header["code"] for m in errors] == [p.BAD_REQUEST], seen
    assert "in flight" in errors[0].header["message"]
    assert sum(m.type == p.END for m in seen) == 1
    text = "".join(p.body(m).get("text", "") for m in seen if m.type in (p.CHUNK, p.END))
    assert text == "one two three four five six"  # each word once: one run, not two
    time.sleep(0.3)  # nothing more comes: the copy was not queued either
    assert not sock.poll(0)


def test_broker_killed_and_restarted_mid_stream_loses_nothing(pipeline) -> None:
    pipeline.start_broker()
    pipeline.start_worker("e1", "--step-delay-ms", "20")
    pipeline.start_worker("e2", "--step-delay-ms", "20")
    pipeline.wait_workers(2)
    during = []

    async def fault(client: AsyncClient) -> None:  # kill -9, a request, then start again
        os.kill(pipeline.broker.pid, signal.SIGKILL)
        pipeline.broker.wait()
        during.append(await client.submit("echo", "sent while the broker was down"))
        pipeline.start_broker()

    async def run() -> tuple[list[str], float, str]:
        texts, pause = await echo_streams(pipeline.frontend, 16, fault)
        return texts, pause, (await during[0].result(60)).text

    texts, pause, sent_during = asyncio.run(run())
    assert texts == [f"s{i} {WORDS}" for i in range(16)], pipeline.dump_logs()
    assert sent_during == "sent while the broker was down"
    assert pause < 30, pause  # a pause, well inside the 60 s read timeout
    # the workers dropped the old broker's work instead of finishing it into the void
    rows = pipeline.wait_workers(2)
    assert wait_for(lambda: all(w["in_flight"] == 0 for w in pipeline.wait_workers(2)), 10)
    assert {w["worker_id"] for w in rows} == {"e1", "e2"}
