"""The Python SDK: `Client` (sync) and `AsyncClient` (asyncio) over one DEALER each.

Connects: one DEALER to each broker frontend in `endpoints`, all active at once (brokers.py).
Out: REQUEST, CANCEL, HEARTBEAT, DISCONNECT, ADMIN.  In: CHUNK, CHUNKS, END, ERROR, HEARTBEAT.

Both clients share `ClientCore` (client_core.py), which holds all protocol state without doing IO.
They differ only in transport: `Client` runs the socket on one IO thread
and callers talk to it through a queue and a wake-up pipe; `AsyncClient` runs it in the event
loop. Many requests are in flight at once on the one socket; replies are matched by id.

Tensors ride in shared memory where the worker can map it, else as raw frames (TensorCodec).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import zmq
import zmq.asyncio

from zeroserve import errors
from zeroserve import protocol as p
from zeroserve.client_core import ClientCore, Out, choice_params, generation_params, request_body
from zeroserve.codec import TensorCodec
from zeroserve.config import ClientConfig, SocketConfig, default_endpoint
from zeroserve.dealers import Dealer
from zeroserve.handles import AsyncRequestHandle, RequestHandle
from zeroserve.keys import PeerKeys
from zeroserve.replies import AsyncCollector, Chunk, Result, ThreadCollector, first_of
from zeroserve.sockets import check_transport, is_disconnect, private_ipc

log = logging.getLogger("zeroserve.client")

__all__ = ["AsyncClient", "AsyncRequestHandle", "Chunk", "Client", "RequestHandle", "Result"]


def _config(endpoints: str | Sequence[str] | None, timeout_s: float | None,
            heartbeat_interval_s: float, keys: PeerKeys | None = None,
            insecure: bool = False, max_message_mb: int | None = None) -> ClientConfig:
    if endpoints is None:
        endpoints = os.environ.get("ZEROSERVE_ENDPOINT") or default_endpoint("frontend")
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e]
    check_transport(list(endpoints), keys is not None, insecure, log)
    for endpoint in endpoints:  # refuse a squattable ipc path before anything is sent there
        private_ipc(endpoint)
    return ClientConfig(tuple(endpoints), heartbeat_interval_s=heartbeat_interval_s,
                        timeout_s=timeout_s,
                        sockets=SocketConfig(curve=keys, insecure=insecure,
                                             **({"max_message_bytes": max_message_mb << 20}
                                                if max_message_mb else {})))


class Client:
    """Synchronous client. Thread-safe: any thread may call it; one IO thread owns the socket.

    >>> with Client() as c:  # the default deployment's frontend
    ...     print(c.generate("echo", "hello world").text)
    """

    def __init__(self, endpoints: str | Sequence[str] | None = None, *,
                 timeout_s: float | None = None,
                 heartbeat_interval_s: float = ClientConfig.heartbeat_interval_s,
                 keys: PeerKeys | None = None, insecure: bool = False,
                 max_message_mb: int | None = None, ctx: zmq.Context | None = None) -> None:
        self.core = ClientCore(_config(endpoints, timeout_s, heartbeat_interval_s, keys,
                                       insecure, max_message_mb))
        self.tensors = TensorCodec(self.core.cfg.endpoints)
        self.ctx = ctx or zmq.Context.instance()
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._lock = threading.Lock()  # guards core state shared with the IO thread
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closed = threading.Event()
        self._io = threading.Thread(target=self._io_loop, name="zeroserve-client", daemon=True)
        self._io.start()

    # -- public API ----------------------------------------------------------------------

    def submit(self, model: str, prompt: str | None = None, *, buffers: Sequence[Any] = (),
               request_id: str | None = None, resume: bool = True, tenant: str = "",
               trace: str = "", **params: Any) -> RequestHandle:
        """Send a request without waiting: returns a handle to stream or wait on. A generation
        whose worker dies goes on on another one unless resume=False (client_core.py).
        `tenant` names whom it is for (the broker shares its queue fairly between tenants);
        `trace`, a W3C traceparent, makes the broker's and worker's spans its children
        (tracing.py)."""
        rid = request_id or self.core.new_id()
        sink = ThreadCollector()
        with self._lock:
            self.core.submit(rid, model, request_body(prompt, params), buffers, sink, resume,
                             tenant, trace)
        self._command(("submit", rid))
        return RequestHandle(self, rid, sink)

    def generate(self, model: str, prompt: str | None = None, *,
                 timeout_s: float | None = None, **params: Any) -> Result:
        """A generation's result. With n > 1, n requests (choice i of a seeded one seeded
        seed + i): the first choice's result, every choice in its `choices`."""
        handles = [self.submit(model, prompt, **each) for each in choice_params(params)]
        return first_of([h.result(timeout_s) for h in handles])

    def stream(self, model: str, prompt: str | None = None, *, timeout_s: float | None = None,
               **params: Any) -> Iterator[Chunk]:
        yield from self.submit(model, prompt, **generation_params(params)).chunks(timeout_s)

    def chat(self, model: str, messages: list[dict[str, Any]], *,
             timeout_s: float | None = None, **params: Any) -> Result:
        """A chat turn: `messages` through the model's chat template; `params` as generate's
        (zeroserve/contract.py), `n` too."""
        return self.generate(model, messages=messages, timeout_s=timeout_s, **params)

    def empty(self, shape: Sequence[int], dtype: Any = None) -> Any:
        """A tensor allocated in this client's shared-memory arena: fill it and `infer` sends
        it without a copy."""
        import torch

        return self.tensors.arena.empty(tuple(shape), dtype or torch.float32)

    def infer(self, model: str, inputs: dict[str, Any], *, timeout_s: float | None = None,
              shm: bool | None = None, copy: bool = False) -> dict[str, Any]:
        """Run a tensor model: {name: tensor or ndarray} in, {name: tensor} out."""
        body, frames = self.tensors.request(model, inputs, shm)
        try:
            result = self.submit(model, buffers=frames, **body).result(timeout_s)
        except errors.ShmUnreachableError:  # resend as frames, or raise
            body, frames = self.tensors.as_frames(model, inputs, body, shm)
            result = self.submit(model, buffers=frames, **body).result(timeout_s)
        return self.tensors.outputs(result, copy)

    def embed(self, model: str, texts: str | list[str], *, normalize: bool = True,
              timeout_s: float | None = None) -> Any:
        """Embeddings [n, dim] (float32) for a text or a list of texts."""
        result = self.submit(model, input=texts, normalize=normalize, **self.tensors.domain
                             ).result(timeout_s)
        return self.tensors.outputs(result, copy=True)["embeddings"]

    def admin(self, op: str, timeout_s: float = 5.0, **args: Any) -> dict[str, Any]:
        rid = self.core.new_id()
        sink = ThreadCollector()
        with self._lock:
            self.core.admin(rid, op, args, sink)
        self._command(("submit", rid))
        return RequestHandle(self, rid, sink).result(timeout_s).data

    def workers(self) -> list[dict[str, Any]]:
        return self.admin("workers")["workers"]

    def cancel(self, rid: str) -> None:
        with self._lock:
            out = self.core.cancel(rid)
        if out is not None:
            self._command(("send", out))

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._command(("close",))
        self._io.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- IO thread -----------------------------------------------------------------------

    def _command(self, cmd: tuple[Any, ...]) -> None:
        if self._closed.is_set():
            raise errors.UnavailableError("client is closed")
        self._commands.append(cmd)
        os.write(self._wake_w, b"x")

    def _io_loop(self) -> None:
        links = [Dealer(self.ctx, self.core, i) for i in range(len(self.core.cfg.endpoints))]
        core = self.core

        def send(outs: list[Out]) -> None:
            for via, frames in outs:
                links[via].send(frames)

        try:
            while True:
                poller = zmq.Poller()
                poller.register(self._wake_r, zmq.POLLIN)
                for link in links:
                    link.register(poller)
                events = dict(poller.poll(100))
                if self._wake_r in events:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                while self._commands:
                    cmd = self._commands.popleft()
                    if cmd[0] == "close":
                        for link in links:
                            link.send(p.encode(p.DISCONNECT, {"reason": "client closed"}))
                        with self._lock:
                            core.fail_all("client closed")
                        return
                    if cmd[0] == "submit":  # where it goes now: a failover may have moved it
                        with self._lock:
                            first = core.outgoing(cmd[1])
                        send([first] if first else [])
                    else:
                        send([cmd[1]])
                for link in links:
                    if link.sock in events:
                        for frames in link.read():
                            with self._lock:
                                again = core.on_frames(link.index, p.materialize(frames))
                            send(again)  # generations whose worker was lost go on
                    if link.monitor in events and link.disconnected():
                        core.brokers.disconnected(link.index)
                now = time.monotonic()
                send(core.heartbeats_due(now))
                for i in core.brokers_lost(now):
                    links[i].reconnect()
                    with self._lock:
                        again = core.failover(i)
                    send(again)
        finally:
            self._closed.set()
            for link in links:
                link.close()


class AsyncClient:
    """asyncio client: the same core, the socket driven by the running event loop."""

    def __init__(self, endpoints: str | Sequence[str] | None = None, *,
                 timeout_s: float | None = None,
                 heartbeat_interval_s: float = ClientConfig.heartbeat_interval_s,
                 keys: PeerKeys | None = None, insecure: bool = False,
                 max_message_mb: int | None = None, ctx: zmq.asyncio.Context | None = None) -> None:
        self.core = ClientCore(_config(endpoints, timeout_s, heartbeat_interval_s, keys,
                                       insecure, max_message_mb))
        self.tensors = TensorCodec(self.core.cfg.endpoints)
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.links = [Dealer(self.ctx, self.core, i) for i in range(len(self.core.cfg.endpoints))]
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _send(self, outs: list[Out]) -> None:
        for via, frames in outs:
            with contextlib.suppress(zmq.ZMQError):  # closed under us: its requests fail over
                await self.links[via].sock.send_multipart(frames, copy=False)

    async def _read_loop(self) -> None:
        core = self.core
        while not self._closed:
            poller = zmq.asyncio.Poller()
            for link in self.links:
                link.register(poller)
            # poll, then read without blocking: a cancelled recv future could lose a message
            events = dict(await poller.poll(100))
            for link in self.links:
                if link.sock in events:
                    for _ in range(1024):
                        try:
                            frames = await link.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        await self._send(core.on_frames(link.index, p.materialize(frames)))
                if link.monitor in events:
                    seen = False
                    with contextlib.suppress(zmq.Again):
                        while True:
                            seen |= is_disconnect(await link.monitor.recv_multipart(zmq.NOBLOCK))
                    if seen:
                        core.brokers.disconnected(link.index)
            now = time.monotonic()
            await self._send(core.heartbeats_due(now))
            for i in core.brokers_lost(now):
                self.links[i].reconnect()
                await self._send(core.failover(i))

    async def submit(self, model: str, prompt: str | None = None, *, buffers: Sequence[Any] = (),
                     request_id: str | None = None, resume: bool = True, tenant: str = "",
                     trace: str = "", **params: Any) -> AsyncRequestHandle:
        if self._closed:
            raise errors.UnavailableError("client is closed")
        self._ensure_reader()
        rid = request_id or self.core.new_id()
        sink = AsyncCollector()
        self.core.submit(rid, model, request_body(prompt, params), buffers, sink, resume,
                         tenant, trace)
        await self._send([out] if (out := self.core.outgoing(rid)) else [])
        return AsyncRequestHandle(self, rid, sink)

    async def generate(self, model: str, prompt: str | None = None, *,
                       timeout_s: float | None = None, **params: Any) -> Result:
        handles = [await self.submit(model, prompt, **each) for each in choice_params(params)]
        return first_of([await h.result(timeout_s) for h in handles])

    async def stream(self, model: str, prompt: str | None = None, *,
                     timeout_s: float | None = None, **params: Any) -> AsyncIterator[Chunk]:
        handle = await self.submit(model, prompt, **generation_params(params))
        async for chunk in handle.chunks(timeout_s):
            yield chunk

    async def chat(self, model: str, messages: list[dict[str, Any]], *,
                   timeout_s: float | None = None, **params: Any) -> Result:
        """A chat turn: `messages` through the model's chat template; `params` as generate's
        (zeroserve/contract.py), `n` too."""
        return await self.generate(model, messages=messages, timeout_s=timeout_s, **params)

    def empty(self, shape: Sequence[int], dtype: Any = None) -> Any:
        import torch

        return self.tensors.arena.empty(tuple(shape), dtype or torch.float32)

    async def infer(self, model: str, inputs: dict[str, Any], *, timeout_s: float | None = None,
                    shm: bool | None = None, copy: bool = False) -> dict[str, Any]:
        body, frames = self.tensors.request(model, inputs, shm)
        try:
            result = await (await self.submit(model, buffers=frames, **body)).result(timeout_s)
        except errors.ShmUnreachableError:  # resend as frames, or raise
            body, frames = self.tensors.as_frames(model, inputs, body, shm)
            result = await (await self.submit(model, buffers=frames, **body)).result(timeout_s)
        return self.tensors.outputs(result, copy)

    async def embed(self, model: str, texts: str | list[str], *, normalize: bool = True,
                    timeout_s: float | None = None) -> Any:
        handle = await self.submit(model, input=texts, normalize=normalize,
                                   **self.tensors.domain)
        return self.tensors.outputs(await handle.result(timeout_s), copy=True)["embeddings"]

    async def admin(self, op: str, timeout_s: float = 5.0, **args: Any) -> dict[str, Any]:
        self._ensure_reader()
        rid = self.core.new_id()
        sink = AsyncCollector()
        self.core.admin(rid, op, args, sink)
        await self._send([out] if (out := self.core.outgoing(rid)) else [])
        return (await AsyncRequestHandle(self, rid, sink).result(timeout_s)).data

    async def workers(self) -> list[dict[str, Any]]:
        return (await self.admin("workers"))["workers"]

    async def cancel(self, rid: str) -> None:
        self.cancel_nowait(rid)

    @property
    def broker_alive(self) -> bool:
        """Whether a broker has answered within its heartbeat expiry."""
        return self.core.broker_alive

    def in_flight(self, rid: str) -> bool:
        """Whether request `rid` is still waiting for its reply."""
        return rid in self.core.pending

    def cancel_nowait(self, rid: str) -> None:
        """Cancel without awaiting: safe inside a task that is itself being cancelled."""
        out = self.core.cancel(rid)
        if out is not None and not self._closed:
            with contextlib.suppress(zmq.ZMQError):  # queued at once; the future not needed
                self.links[out[0]].sock.send_multipart(out[1])

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        bye = p.encode(p.DISCONNECT, {"reason": "client closed"})
        await self._send([(i, bye) for i in range(len(self.links))])
        self.core.fail_all("client closed")
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        for link in self.links:
            link.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
