"""The SDK's protocol core, shared by the sync and async clients: no sockets, no threads.

`ClientCore` holds all request state: which requests are in flight, which have started
streaming, when the broker last spoke, what to resend after a reconnect. Replies go to a
per-request `Collector` that merges text/token deltas while its reader lags, so a slow
consumer never grows an unbounded per-token queue. `Chunk` and `Result` are what callers see.

Resumable generation: for each text generation in flight the core keeps the token ids and the
length of text it has received. When its worker is lost (WORKER_LOST) or its broker goes
silent, it sends the request again with `resume` = {token_ids, text_chars}: the next worker
goes on from there (llm/engine.py) and the caller's stream continues with no gap and no
repeat, up to `max_resumes` times. The record lives here, not in the broker, because only
here does it outlive the broker as well, and the broker never has to decode a chunk.

A broker that restarts faster than its silence budget answers heartbeats as before, but its
heartbeats carry a new `epoch`: every request in flight died with the old process, so all are
sent again marked `again` (those that reached the new broker already are not run twice),
generations resuming from what they received.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zeroserve import contract, errors
from zeroserve import prefix as prefixes
from zeroserve import protocol as p
from zeroserve.config import ClientConfig

log = logging.getLogger("zeroserve.client")
GENERATION_FIELDS = ("prompt", "messages", "prompt_token_ids")


class PayloadView:
    """Read access to the usual fields of a reply payload (`data`)."""

    __slots__ = ()
    data: dict[str, Any]

    @property
    def text(self) -> str:
        return self.data.get("text", "")

    @property
    def token_ids(self) -> list[int]:
        return self.data.get("token_ids", [])


@dataclass(slots=True)
class Chunk(PayloadView):
    """One streamed part: a delta payload (e.g. text, token_ids) and any raw buffers."""

    data: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)
    final: bool = False


@dataclass(slots=True)
class Result(PayloadView):
    """A finished request: merged deltas plus the END fields (finish_reason, usage, ...)."""

    request_id: str
    data: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)

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


class ThreadCollector(Collector):
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


class AsyncCollector(Collector):
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
class _Resume:
    """What a resumable generation has received so far, to send again if its worker dies."""

    model: str
    body: dict[str, Any]
    tenant: str = ""
    trace: str = ""
    prefix: list[bytes] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text_chars: int = 0
    resumes: int = 0

    def record(self, data: dict[str, Any]) -> None:
        ids, text = data.get("token_ids"), data.get("text")
        if isinstance(ids, list):
            self.token_ids.extend(ids)
        if isinstance(text, str):
            self.text_chars += len(text)


@dataclass(slots=True)
class _Pending:
    frames: list[bytes]
    sink: Collector
    started: bool = False
    resent: int = 0
    resume: _Resume | None = None  # None: not a generation, or the caller opted out


class ClientCore:
    """Protocol state shared by both clients: no sockets, no threads, no event loop."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.pending: dict[str, _Pending] = {}
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._endpoint_index = 0
        self.broker_expiry = time.monotonic() + cfg.expiry_s
        self.epoch: str | None = None  # the broker process heard from (its heartbeats)
        self.last_heard = time.monotonic()  # a grace period for the first connection
        self.next_beat = time.monotonic()  # at once: the broker's epoch, before any request

    @property
    def endpoint(self) -> str:
        return self.cfg.endpoints[self._endpoint_index % len(self.cfg.endpoints)]

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def submit(self, rid: str, model: str, body: dict[str, Any], buffers: Sequence[Any],
               sink: Collector, resumable: bool = True, tenant: str = "",
               trace: str = "") -> list[Any]:
        generation = not buffers and any(f in body for f in GENERATION_FIELDS)
        prefix = prefixes.hashes(model, tenant, body) if generation else []
        frames = p.request(rid, model, body, *buffers, tenant=tenant, trace=trace,
                           prefix=prefix)
        limit = self.cfg.sockets.max_message_bytes
        size = sum(map(frame_nbytes, frames))
        if size > limit:  # the broker would refuse it (and zmq drop a frame over the limit)
            raise errors.BadRequestError(f"a request of {size} bytes exceeds the "
                                         f"{limit}-byte message limit", rid)
        resume = _Resume(model, body, tenant, trace, prefix) if resumable and generation else None
        self.pending[rid] = _Pending(frames, sink, resume=resume)
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

    def on_frames(self, frames: list[bytes]) -> list[list[bytes]]:
        """Take one message from the broker; return what to send back (resumed requests)."""
        self.last_heard = time.monotonic()
        self.broker_expiry = self.last_heard + self.cfg.expiry_s
        try:
            msg = p.decode(frames, self.cfg.sockets.max_message_bytes)
        except p.ProtocolError:
            return []
        if msg.type == p.HEARTBEAT:
            return self._on_epoch(msg.header.get("epoch"))
        if msg.type == p.DISCONNECT:
            return []
        if msg.type == p.CHUNKS:
            try:
                parts = p.split_chunks(msg)
            except p.ProtocolError:
                return []  # garbled: its requests' ENDs (or silence budgets) still come
            for rid, data in parts:
                if (pend := self.pending.get(rid)) is not None:
                    self._on_data(rid, pend, data, [], final=False)
            return []
        rid = msg.header.get("id")
        pend = self.pending.get(rid) if isinstance(rid, str) else None
        if pend is None:
            return []
        if msg.type in (p.CHUNK, p.END):
            try:
                data = p.body(msg)
            except p.ProtocolError as exc:  # a garbled reply fails its request, not the client
                del self.pending[rid]
                pend.sink.put(errors.InternalError(f"malformed reply: {exc}", rid))
                return []
            self._on_data(rid, pend, data, msg.buffers[1:], final=msg.type == p.END)
        elif msg.type == p.ERROR:
            h = msg.header
            # a lost worker, or a broker that dropped the job (it thought us gone): go on
            lost = {p.WORKER_LOST: "worker lost", p.UNAVAILABLE: "dropped by the broker"}
            why = lost.get(h.get("code"))  # type: ignore[call-overload]
            if why and self._resume(rid, pend, why):
                return [pend.frames]
            del self.pending[rid]
            pend.sink.put(errors.from_code(str(h.get("code")), str(h.get("message")), rid))
        return []

    def _on_data(self, rid: str, pend: _Pending, data: dict[str, Any], buffers: list[Any],
                 final: bool) -> None:
        if final:
            del self.pending[rid]
        elif pend.resume is not None:
            pend.resume.record(data)
        pend.started, pend.resent = True, 0  # progress: a fresh failover budget
        pend.sink.put(Chunk(data, buffers, final=final))

    def _resume(self, rid: str, pend: _Pending, why: str, count: bool = True) -> bool:
        """Make `pend.frames` the request that goes on from what was received, if allowed.
        Only lost workers count against max_resumes (a request that kills every worker it
        meets must end); broker failovers are bounded by max_resends."""
        r = pend.resume
        if r is None or (count and r.resumes >= self.cfg.max_resumes):
            return False
        r.resumes += count
        body = r.body
        if r.token_ids:
            body = {**body, "resume": {"token_ids": list(r.token_ids),
                                       "text_chars": r.text_chars}}
        pend.frames = p.request(rid, r.model, body, tenant=r.tenant, trace=r.trace,
                                prefix=r.prefix)
        # a broker's loss is one event, logged once by its caller; a worker's, per request
        log.log(logging.INFO if count else logging.DEBUG, "request %s resumed after %d tokens "
                "(%s)", rid, len(r.token_ids), why)
        return True

    def _on_epoch(self, epoch: Any) -> list[list[bytes]]:
        """A broker heartbeat: a new epoch is a new broker process, which knows none of our
        requests. Send them all again, marked `again`; generations that streamed resume
        from what they received; what started and cannot resume fails (UnavailableError)."""
        if not isinstance(epoch, str) or epoch == self.epoch:
            return []
        known, self.epoch = self.epoch, epoch
        if known is None or not self.pending:
            return []
        log.warning("broker restarted (epoch %s, was %s): sending %d requests again", epoch,
                    known, len(self.pending))
        resend = []
        for rid, pend in list(self.pending.items()):
            if pend.started and not self._resume(rid, pend, "broker restarted", count=False):
                del self.pending[rid]
                pend.sink.put(errors.UnavailableError("broker restarted mid-stream", rid))
                resend.append(p.cancel(rid))  # in case it reached the new broker
                continue
            if pend.frames[1] == p.REQUEST:
                pend.frames = p.again(pend.frames)
            resend.append(pend.frames)
        return resend

    def heartbeat_due(self, now: float) -> bool:
        if now < self.next_beat:
            return False
        self.next_beat = now + self.cfg.heartbeat_interval_s
        return True

    def broker_lost(self, now: float) -> bool:
        return now > self.broker_expiry

    def failover(self) -> list[list[bytes]]:
        """The broker went silent: move to the next endpoint. Requests that streamed nothing
        are resent there (up to max_resends times), generations that had started resume there;
        the others fail with UnavailableError, as do those that ran out of resends: nothing
        waits forever."""
        self._endpoint_index += 1
        self.broker_expiry = time.monotonic() + self.cfg.expiry_s
        if self.pending:
            log.warning("broker silent for %.1f s: %d requests go on through %s",
                        self.cfg.expiry_s, len(self.pending), self.endpoint)
        resend = []
        for rid, pend in list(self.pending.items()):
            if (pend.started and pend.resent < self.cfg.max_resends
                    and self._resume(rid, pend, "broker lost", count=False)):
                pend.resent += 1
                resend.append(pend.frames)
            elif pend.started or pend.resent >= self.cfg.max_resends:
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


def frame_nbytes(frame: Any) -> int:
    return frame.nbytes if isinstance(frame, memoryview) else len(frame)


def request_body(prompt: str | None, params: dict[str, Any]) -> dict[str, Any]:
    """The body to send, its parameters checked against the contract first (a
    BadRequestError here, not a round trip to a worker)."""
    try:
        contract.check(params)
    except ValueError as exc:
        raise errors.BadRequestError(str(exc)) from None
    return params if prompt is None else {"prompt": prompt, **params}


def merge_result(rid: str, parts: list[Chunk]) -> Result:
    data: dict[str, Any] = {}
    buffers: list[bytes] = []
    for part in parts:
        merge_delta(data, part.data)
        buffers.extend(part.buffers)
    return Result(rid, data, buffers)


def deadline_of(timeout_s: float | None, default_s: float | None) -> float | None:
    t = timeout_s if timeout_s is not None else default_s
    return None if t is None else time.monotonic() + t


def time_left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def settle(item: Chunk | errors.ZeroserveError | None, rid: str) -> Chunk:
    """A reply item as a chunk; raise its error, or a timeout when nothing came (None)."""
    if item is None:
        raise errors.RequestTimeoutError("no reply in time", rid)
    if isinstance(item, errors.ZeroserveError):
        raise item
    return item
