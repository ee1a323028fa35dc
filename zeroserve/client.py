"""The Python SDK: `Client` (sync) and `AsyncClient` (asyncio) over one DEALER each.

Connects: DEALER -> broker frontend (one of `endpoints`; the next one on failover).
Out: REQUEST, CANCEL, HEARTBEAT, DISCONNECT, ADMIN.  In: CHUNK, END, ERROR, HEARTBEAT.

Both clients share `ClientCore`, which holds all protocol state without doing IO: which
requests are in flight, which have started streaming, when the broker last spoke, what to resend
after a reconnect. They differ only in transport: `Client` runs the socket on one IO thread
and callers talk to it through a queue and a wake-up pipe; `AsyncClient` runs it in the event
loop. Many requests are in flight at once on the one socket; replies are matched by id.

Each request's replies go to a collector that merges text/token deltas when the consumer lags,
so a slow reader never grows an unbounded per-token queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from zeroserve import errors
from zeroserve import protocol as p
from zeroserve.config import ClientConfig, default_endpoint
from zeroserve.sockets import make_socket

__all__ = ["AsyncClient", "Chunk", "Client", "Result"]


@dataclass(slots=True)
class Chunk:
    """One streamed part: a delta payload (e.g. text, token_ids) and any raw buffers."""

    data: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)
    final: bool = False

    @property
    def text(self) -> str:
        return self.data.get("text", "")

    @property
    def token_ids(self) -> list[int]:
        return self.data.get("token_ids", [])


@dataclass(slots=True)
class Result:
    """A finished request: merged deltas plus the END fields (finish_reason, usage, ...)."""

    request_id: str
    data: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.data.get("text", "")

    @property
    def token_ids(self) -> list[int]:
        return self.data.get("token_ids", [])

    @property
    def finish_reason(self) -> str | None:
        return self.data.get("finish_reason")

    @property
    def usage(self) -> dict[str, int]:
        return self.data.get("usage", {})


def merge_delta(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """Fold a delta into an accumulated payload: strings concatenate, lists extend."""
    for k, v in delta.items():
        old = into.get(k)
        if isinstance(old, str) and isinstance(v, str):
            into[k] = old + v
        elif isinstance(old, list) and isinstance(v, list):
            old.extend(v)
        else:
            into[k] = list(v) if isinstance(v, list) else v


class Collector:
    """Per-request reply buffer. Consecutive plain chunks merge while nobody reads them."""

    def __init__(self) -> None:
        self.items: collections.deque[Chunk | errors.ZeroserveError] = collections.deque()
        self.done = False

    def put(self, item: Chunk | errors.ZeroserveError) -> None:
        last = self.items[-1] if self.items else None
        if (isinstance(item, Chunk) and isinstance(last, Chunk) and not last.final
                and not last.buffers and not item.buffers):
            merge_delta(last.data, item.data)
            last.final = item.final
        else:
            self.items.append(item)
        if not isinstance(item, Chunk) or item.final:
            self.done = True
        self.notify()

    def notify(self) -> None:
        pass


class _ThreadCollector(Collector):
    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()

    def put(self, item: Chunk | errors.ZeroserveError) -> None:
        with self.cond:
            super().put(item)

    def notify(self) -> None:
        self.cond.notify()

    def get(self, timeout: float | None) -> Chunk | errors.ZeroserveError | None:
        with self.cond:
            if not self.items:
                self.cond.wait(timeout)
            return self.items.popleft() if self.items else None


class _AsyncCollector(Collector):
    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def notify(self) -> None:
        self.event.set()

    async def get(self, timeout: float | None) -> Chunk | errors.ZeroserveError | None:
        if not self.items:
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), timeout)
            except TimeoutError:
                return None
        return self.items.popleft() if self.items else None


@dataclass(slots=True)
class _Pending:
    frames: list[bytes]
    sink: Collector
    started: bool = False
    resent: int = 0


class ClientCore:
    """Protocol state shared by both clients: no sockets, no threads, no event loop."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.pending: dict[str, _Pending] = {}
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._endpoint_index = 0
        self.broker_expiry = time.monotonic() + cfg.expiry_s
        self.last_heard = time.monotonic()  # a grace period for the first connection
        self.next_beat = time.monotonic() + cfg.heartbeat_interval_s

    @property
    def endpoint(self) -> str:
        return self.cfg.endpoints[self._endpoint_index % len(self.cfg.endpoints)]

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def submit(self, rid: str, model: str, body: dict[str, Any], buffers: Sequence[Any],
               sink: Collector) -> list[Any]:
        frames = p.request(rid, model, body, *buffers)
        limit = self.cfg.sockets.max_message_bytes
        too_big = next((n for n in map(_nbytes, frames) if n > limit), None)
        if too_big is not None:  # zmq would drop the connection and the request silently
            raise errors.BadRequestError(f"a frame of {too_big} bytes exceeds the "
                                         f"{limit}-byte message limit", rid)
        self.pending[rid] = _Pending(frames, sink)
        return frames

    def admin(self, rid: str, op: str, args: dict[str, Any], sink: Collector) -> list[Any]:
        frames = p.admin(rid, op, **args)
        self.pending[rid] = _Pending(frames, sink)
        return frames

    def cancel(self, rid: str) -> list[bytes] | None:
        """Forget a request (its reader gets CancelledError); the CANCEL frames to send."""
        pend = self.pending.pop(rid, None)
        if pend is None:
            return None
        pend.sink.put(errors.CancelledError("cancelled by the client", rid))
        return p.cancel(rid)

    def on_frames(self, frames: list[bytes]) -> None:
        self.last_heard = time.monotonic()
        self.broker_expiry = self.last_heard + self.cfg.expiry_s
        try:
            msg = p.decode(frames)
        except p.ProtocolError:
            return
        if msg.type in (p.HEARTBEAT, p.DISCONNECT):
            return
        rid = msg.header.get("id")
        pend = self.pending.get(rid) if isinstance(rid, str) else None
        if pend is None:
            return
        if msg.type in (p.CHUNK, p.END):
            try:
                data = p.body(msg)
            except p.ProtocolError as exc:  # a garbled reply fails its request, not the client
                del self.pending[rid]
                pend.sink.put(errors.InternalError(f"malformed reply: {exc}", rid))
                return
            final = msg.type == p.END
            if final:
                del self.pending[rid]
            pend.started = True
            pend.sink.put(Chunk(data, msg.buffers[1:], final=final))
        elif msg.type == p.ERROR:
            del self.pending[rid]
            h = msg.header
            pend.sink.put(errors.from_code(str(h.get("code")), str(h.get("message")), rid))

    def heartbeat_due(self, now: float) -> bool:
        if now < self.next_beat:
            return False
        self.next_beat = now + self.cfg.heartbeat_interval_s
        return True

    def broker_lost(self, now: float) -> bool:
        return now > self.broker_expiry

    def failover(self) -> list[list[bytes]]:
        """The broker went silent: move to the next endpoint. Requests that streamed nothing
        are resent there (up to max_resends times); ones that had started fail with
        UnavailableError, as do those that ran out of resends: nothing waits forever."""
        self._endpoint_index += 1
        self.broker_expiry = time.monotonic() + self.cfg.expiry_s
        resend = []
        for rid, pend in list(self.pending.items()):
            if pend.started or pend.resent >= self.cfg.max_resends:
                del self.pending[rid]
                why = "broker lost mid-stream" if pend.started else "no broker answered"
                pend.sink.put(errors.UnavailableError(why, rid))
            else:
                pend.resent += 1
                resend.append(pend.frames)
        return resend

    @property
    def broker_alive(self) -> bool:
        """Heard from a broker within heartbeat x liveness."""
        return time.monotonic() - self.last_heard < self.cfg.expiry_s

    def fail_all(self, why: str) -> None:
        for rid, pend in self.pending.items():
            pend.sink.put(errors.UnavailableError(why, rid))
        self.pending.clear()


def _nbytes(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def _config(endpoints: str | Sequence[str] | None, timeout_s: float | None,
            heartbeat_interval_s: float) -> ClientConfig:
    if endpoints is None:
        endpoints = os.environ.get("ZEROSERVE_ENDPOINT") or default_endpoint("frontend")
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e]
    return ClientConfig(tuple(endpoints), heartbeat_interval_s=heartbeat_interval_s,
                        timeout_s=timeout_s)


def _body(prompt: str | None, params: dict[str, Any]) -> dict[str, Any]:
    return params if prompt is None else {"prompt": prompt, **params}


def _result(rid: str, parts: list[Chunk]) -> Result:
    data: dict[str, Any] = {}
    buffers: list[bytes] = []
    for part in parts:
        merge_delta(data, part.data)
        buffers.extend(part.buffers)
    return Result(rid, data, buffers)


class TensorCodec:
    """Tensors in and out of requests: this client's arena for inputs on the same host, the
    mappings of workers' arenas for outputs, raw frames for remote brokers."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.local = all(e.startswith("ipc://") or "//127.0.0.1:" in e or "//localhost:" in e
                         for e in endpoints)
        self._arena: Any = None
        self._maps: Any = None

    @property
    def arena(self) -> Any:
        if self._arena is None:
            from zeroserve.arena import Arena

            self._arena = Arena()
        return self._arena

    @property
    def maps(self) -> Any:
        if self._maps is None:
            from zeroserve.arena import Mappings

            self._maps = Mappings()
        return self._maps

    def request(self, inputs: dict[str, Any], shm: bool | None) -> tuple[dict, list]:
        from zeroserve import tensors

        use_shm = self.local if shm is None else shm
        entries, frames = tensors.pack(inputs, self.arena if use_shm else None)
        return {"inputs": entries, "reply": "shm" if use_shm else "frames"}, frames

    def outputs(self, result: Result, copy: bool = False) -> dict[str, Any]:
        """Tensors of a tensor reply. Shared-memory outputs are views; their slabs go back to
        the worker when the tensor is garbage collected (or at once with copy=True)."""
        import weakref

        from zeroserve import tensors

        entries = result.data.get("outputs")
        out = tensors.unpack(entries, result.buffers, self.maps)
        for name, entry in (entries or {}).items():
            if isinstance(entry, dict) and "shm" in entry:
                if copy:
                    out[name] = out[name].clone()
                    self.maps.release(entry["shm"])
                else:
                    weakref.finalize(out[name], self.maps.release, entry["shm"])
        return out


def _deadline(timeout_s: float | None, default_s: float | None) -> float | None:
    t = timeout_s if timeout_s is not None else default_s
    return None if t is None else time.monotonic() + t


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _settle(item: Chunk | errors.ZeroserveError | None, rid: str) -> Chunk:
    """A reply item as a chunk; raise its error, or a timeout when nothing came (None)."""
    if item is None:
        raise errors.RequestTimeoutError("no reply in time", rid)
    if isinstance(item, errors.ZeroserveError):
        raise item
    return item


class Client:
    """Synchronous client. Thread-safe: any thread may call it; one IO thread owns the socket.

    >>> with Client("ipc:///tmp/zeroserve-default-frontend.sock") as c:
    ...     print(c.generate("echo", "hello world").text)
    """

    def __init__(self, endpoints: str | Sequence[str] | None = None, *,
                 timeout_s: float | None = None, heartbeat_interval_s: float = 1.0,
                 ctx: zmq.Context | None = None) -> None:
        self.core = ClientCore(_config(endpoints, timeout_s, heartbeat_interval_s))
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
               request_id: str | None = None, **params: Any) -> RequestHandle:
        """Send a request without waiting: returns a handle to stream or wait on."""
        rid = request_id or self.core.new_id()
        sink = _ThreadCollector()
        with self._lock:
            frames = self.core.submit(rid, model, _body(prompt, params), buffers, sink)
        self._command(("send", frames))
        return RequestHandle(self, rid, sink)

    def generate(self, model: str, prompt: str | None = None, *,
                 timeout_s: float | None = None, **params: Any) -> Result:
        return self.submit(model, prompt, **params).result(timeout_s)

    def stream(self, model: str, prompt: str | None = None, *, timeout_s: float | None = None,
               **params: Any) -> Iterator[Chunk]:
        yield from self.submit(model, prompt, **params).chunks(timeout_s)

    def empty(self, shape: Sequence[int], dtype: Any = None) -> Any:
        """A tensor allocated in this client's shared-memory arena: fill it and `infer` sends
        it without a copy."""
        import torch

        return self.tensors.arena.empty(tuple(shape), dtype or torch.float32)

    def infer(self, model: str, inputs: dict[str, Any], *, timeout_s: float | None = None,
              shm: bool | None = None, copy: bool = False) -> dict[str, Any]:
        """Run a tensor model: {name: tensor or ndarray} in, {name: tensor} out."""
        body, frames = self.tensors.request(inputs, shm)
        result = self.submit(model, buffers=frames, **body).result(timeout_s)
        return self.tensors.outputs(result, copy)

    def embed(self, model: str, texts: str | list[str], *, normalize: bool = True,
              timeout_s: float | None = None) -> Any:
        """Embeddings [n, dim] (float32) for a text or a list of texts."""
        reply = "shm" if self.tensors.local else "frames"
        result = self.submit(model, input=texts, normalize=normalize, reply=reply
                             ).result(timeout_s)
        return self.tensors.outputs(result, copy=True)["embeddings"]

    def admin(self, op: str, timeout_s: float = 5.0, **args: Any) -> dict[str, Any]:
        rid = self.core.new_id()
        sink = _ThreadCollector()
        with self._lock:
            frames = self.core.admin(rid, op, args, sink)
        self._command(("send", frames))
        return RequestHandle(self, rid, sink).result(timeout_s).data

    def workers(self) -> list[dict[str, Any]]:
        return self.admin("workers")["workers"]

    def cancel(self, rid: str) -> None:
        with self._lock:
            frames = self.core.cancel(rid)
        if frames is not None:
            self._command(("send", frames))

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

    def _connect(self) -> zmq.Socket:
        sock = make_socket(self.ctx, zmq.DEALER, self.core.cfg.sockets)
        sock.connect(self.core.endpoint)
        return sock

    def _io_loop(self) -> None:
        sock = self._connect()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        core = self.core
        try:
            while True:
                events = dict(poller.poll(100))
                if self._wake_r in events:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                while self._commands:
                    cmd = self._commands.popleft()
                    if cmd[0] == "close":
                        sock.send_multipart(p.encode(p.DISCONNECT, {"reason": "client closed"}))
                        with self._lock:
                            core.fail_all("client closed")
                        return
                    sock.send_multipart(cmd[1], copy=False)
                if sock in events:
                    for _ in range(1024):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        with self._lock:
                            core.on_frames(p.materialize(frames, 4))
                now = time.monotonic()
                if core.heartbeat_due(now):
                    sock.send_multipart(p.encode(p.HEARTBEAT, {}))
                if core.broker_lost(now):
                    with self._lock:
                        resend = core.failover()
                    poller.unregister(sock)
                    sock.close(0)
                    sock = self._connect()
                    poller.register(sock, zmq.POLLIN)
                    for frames in resend:
                        sock.send_multipart(frames, copy=False)
        finally:
            self._closed.set()
            sock.close(0)


class RequestHandle:
    """One in-flight request of the sync client: iterate its chunks or wait for its result."""

    def __init__(self, client: Client, rid: str, sink: _ThreadCollector) -> None:
        self.client, self.id, self.sink = client, rid, sink

    def chunks(self, timeout_s: float | None = None) -> Iterator[Chunk]:
        deadline = _deadline(timeout_s, self.client.core.cfg.timeout_s)
        try:
            while True:
                chunk = _settle(self.sink.get(_remaining(deadline)), self.id)
                yield chunk
                if chunk.final:
                    return
        finally:
            if not self.sink.done:  # broke out, timed out: the worker stops at once
                self.client.cancel(self.id)

    def result(self, timeout_s: float | None = None) -> Result:
        return _result(self.id, list(self.chunks(timeout_s)))

    def cancel(self) -> None:
        self.client.cancel(self.id)


class AsyncClient:
    """asyncio client: the same core, the socket driven by the running event loop."""

    def __init__(self, endpoints: str | Sequence[str] | None = None, *,
                 timeout_s: float | None = None, heartbeat_interval_s: float = 1.0,
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self.core = ClientCore(_config(endpoints, timeout_s, heartbeat_interval_s))
        self.tensors = TensorCodec(self.core.cfg.endpoints)
        self.ctx = ctx or zmq.asyncio.Context.instance()
        self.sock = self._connect()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    def _connect(self) -> zmq.asyncio.Socket:
        sock = make_socket(self.ctx, zmq.DEALER, self.core.cfg.sockets)
        sock.connect(self.core.endpoint)
        return sock

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        core = self.core
        while not self._closed:
            # poll, then read without blocking: a cancelled recv future could lose a message
            if await self.sock.poll(100, zmq.POLLIN):
                for _ in range(1024):
                    try:
                        frames = await self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        core.on_frames(p.materialize(frames, 4))
                    except zmq.Again:
                        break
            now = time.monotonic()
            if core.heartbeat_due(now):
                await self.sock.send_multipart(p.encode(p.HEARTBEAT, {}))
            if core.broker_lost(now):
                resend = core.failover()
                self.sock.close(0)
                self.sock = self._connect()
                for frames in resend:
                    await self.sock.send_multipart(frames, copy=False)

    async def submit(self, model: str, prompt: str | None = None, *, buffers: Sequence[Any] = (),
                     request_id: str | None = None, **params: Any) -> AsyncRequestHandle:
        if self._closed:
            raise errors.UnavailableError("client is closed")
        self._ensure_reader()
        rid = request_id or self.core.new_id()
        sink = _AsyncCollector()
        frames = self.core.submit(rid, model, _body(prompt, params), buffers, sink)
        await self.sock.send_multipart(frames, copy=False)
        return AsyncRequestHandle(self, rid, sink)

    async def generate(self, model: str, prompt: str | None = None, *,
                       timeout_s: float | None = None, **params: Any) -> Result:
        handle = await self.submit(model, prompt, **params)
        return await handle.result(timeout_s)

    async def stream(self, model: str, prompt: str | None = None, *,
                     timeout_s: float | None = None, **params: Any) -> AsyncIterator[Chunk]:
        handle = await self.submit(model, prompt, **params)
        async for chunk in handle.chunks(timeout_s):
            yield chunk

    def empty(self, shape: Sequence[int], dtype: Any = None) -> Any:
        import torch

        return self.tensors.arena.empty(tuple(shape), dtype or torch.float32)

    async def infer(self, model: str, inputs: dict[str, Any], *, timeout_s: float | None = None,
                    shm: bool | None = None, copy: bool = False) -> dict[str, Any]:
        body, frames = self.tensors.request(inputs, shm)
        handle = await self.submit(model, buffers=frames, **body)
        return self.tensors.outputs(await handle.result(timeout_s), copy)

    async def embed(self, model: str, texts: str | list[str], *, normalize: bool = True,
                    timeout_s: float | None = None) -> Any:
        reply = "shm" if self.tensors.local else "frames"
        handle = await self.submit(model, input=texts, normalize=normalize, reply=reply)
        return self.tensors.outputs(await handle.result(timeout_s), copy=True)["embeddings"]

    async def admin(self, op: str, timeout_s: float = 5.0, **args: Any) -> dict[str, Any]:
        self._ensure_reader()
        rid = self.core.new_id()
        sink = _AsyncCollector()
        await self.sock.send_multipart(self.core.admin(rid, op, args, sink))
        return (await AsyncRequestHandle(self, rid, sink).result(timeout_s)).data

    async def workers(self) -> list[dict[str, Any]]:
        return (await self.admin("workers"))["workers"]

    async def cancel(self, rid: str) -> None:
        self.cancel_nowait(rid)

    def cancel_nowait(self, rid: str) -> None:
        """Cancel without awaiting: safe inside a task that is itself being cancelled."""
        frames = self.core.cancel(rid)
        if frames is not None and not self._closed:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart(frames)  # queued at once; the future is not needed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(zmq.ZMQError):
            await self.sock.send_multipart(p.encode(p.DISCONNECT, {"reason": "client closed"}))
        self.core.fail_all("client closed")
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self.sock.close(0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class AsyncRequestHandle:
    def __init__(self, client: AsyncClient, rid: str, sink: _AsyncCollector) -> None:
        self.client, self.id, self.sink = client, rid, sink

    async def chunks(self, timeout_s: float | None = None) -> AsyncIterator[Chunk]:
        deadline = _deadline(timeout_s, self.client.core.cfg.timeout_s)
        try:
            while True:
                chunk = _settle(await self.sink.get(_remaining(deadline)), self.id)
                yield chunk
                if chunk.final:
                    return
        finally:
            if not self.sink.done:
                self.client.cancel_nowait(self.id)

    async def result(self, timeout_s: float | None = None) -> Result:
        return _result(self.id, [c async for c in self.chunks(timeout_s)])

    async def cancel(self) -> None:
        await self.client.cancel(self.id)
