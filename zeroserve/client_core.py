"""The SDK's protocol core, shared by the sync and async clients: no sockets, no threads.

`ClientCore` holds all request state: which requests are in flight and through which broker
(brokers.py: every endpoint is active at once), which have started streaming, what to resend
when a broker is lost. Replies go to each request's `Collector` (replies.py).

Resumable generation: for each text generation in flight the core keeps the token ids and the
length of text it has received. When its worker is lost (WORKER_LOST) or its broker goes
silent, it sends the request again with `resume` = {token_ids, text_chars}: the next worker
goes on from there (llm/engine.py) and the caller's stream continues with no gap and no
repeat, up to `max_resumes` times. The record lives here, not in the broker, because only
here does it outlive the broker as well, and the broker never has to decode a chunk. A lost
broker's requests go on through another live broker the same way.

A broker that restarts faster than its silence budget answers heartbeats as before, but its
heartbeats carry a new `epoch`: every request in flight died with the old process, so all are
sent again marked `again` (those that reached the new broker already are not run twice),
generations resuming from what they received.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zeroserve import contract, errors
from zeroserve import prefix as prefixes
from zeroserve import protocol as p
from zeroserve.brokers import Brokers
from zeroserve.config import ClientConfig
from zeroserve.replies import Chunk, Collector

log = logging.getLogger("zeroserve.client")
GENERATION_FIELDS = ("prompt", "messages", "prompt_token_ids")


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
    via: int  # the broker it goes (or went) through: its index
    sent: bool = False  # handed to a socket (`outgoing`): until then a failover only moves it
    started: bool = False
    resent: int = 0
    resume: _Resume | None = None  # None: not a generation, or the caller opted out


Out = tuple[int, list[Any]]  # a message to send, and the broker (its index) it goes to


class ClientCore:
    """Protocol state shared by both clients: no sockets, no threads, no event loop."""

    def __init__(self, cfg: ClientConfig) -> None:
        self.cfg = cfg
        self.pending: dict[str, _Pending] = {}
        self._prefix = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self.brokers = Brokers(cfg)
        # what the brokers send, one handler per message type (DISCONNECT: none needed)
        self.handlers: dict[int, Callable[[int, p.Message], list[Out]]] = {
            p.HEARTBEAT: self._on_heartbeat, p.CHUNKS: self._on_chunks,
            p.CHUNK: self._on_reply, p.END: self._on_reply, p.ERROR: self._on_reply}

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def submit(self, rid: str, model: str, body: dict[str, Any], buffers: Sequence[Any],
               sink: Collector, resumable: bool = True, tenant: str = "",
               trace: str = "") -> None:
        """Register a request; its first send is `outgoing(rid)`, from the thread that owns
        the sockets (a failover in between moves it instead of sending it twice)."""
        if rid in self.pending:  # never another request's entry: its replies would go astray
            raise errors.BadRequestError(f"request id {rid} is in flight", rid)
        if body.get("timeout") is not None:  # a wall-clock deadline, the same everywhere
            body = {k: v for k, v in body.items() if k != "timeout"} | {
                "deadline": time.time() + float(body["timeout"])}
        generation = (not buffers and "op" not in body  # tokenize/detokenize: no KV, no route
                      and any(f in body for f in GENERATION_FIELDS))
        prefix: list[bytes] = []
        if generation:  # one salt for the worker's cached blocks and the broker's routing
            salt = prefixes.salt(tenant, body.get("cache_salt"))
            body = {**body, "cache_salt": salt} if salt else body
            prefix = prefixes.hashes(model, salt, body)
        frames = p.request(rid, model, body, *buffers, tenant=tenant, trace=trace,
                           prefix=prefix)
        limit = self.cfg.sockets.max_message_bytes
        size = sum(map(frame_nbytes, frames))
        if size > limit:  # the broker would refuse it (and zmq drop a frame over the limit)
            raise errors.BadRequestError(f"a request of {size} bytes exceeds the "
                                         f"{limit}-byte message limit", rid)
        resume = _Resume(model, body, tenant, trace, prefix) if resumable and generation else None
        via = self.brokers.pick(prefix, time.monotonic())
        self.pending[rid] = _Pending(frames, sink, via, resume=resume)

    def admin(self, rid: str, op: str, args: dict[str, Any], sink: Collector) -> None:
        frames = p.admin(rid, op, **args)
        self.pending[rid] = _Pending(frames, sink, self.brokers.pick([], time.monotonic()))

    def outgoing(self, rid: str) -> Out | None:
        """A registered request's first send, where it goes now (None: cancelled, or sent)."""
        pend = self.pending.get(rid)
        if pend is None or pend.sent:
            return None
        pend.sent = True
        return pend.via, pend.frames

    def cancel(self, rid: str) -> Out | None:
        """Forget a request (its reader gets CancelledError); the CANCEL to send."""
        pend = self.pending.pop(rid, None)
        if pend is None:
            return None
        pend.sink.put(errors.CancelledError("cancelled by the client", rid))
        return pend.via, p.cancel(rid)

    def on_frames(self, via: int, frames: list[bytes]) -> list[Out]:
        """Take one message from broker `via`; return what to send (resumed requests)."""
        self.brokers.heard(via, time.monotonic())
        try:
            msg = p.decode(frames, self.cfg.sockets.max_message_bytes)
        except p.ProtocolError:
            return []
        handler = self.handlers.get(msg.type)
        return handler(via, msg) if handler is not None else []

    def _on_heartbeat(self, via: int, msg: p.Message) -> list[Out]:
        return self._on_epoch(via, msg.header.get("epoch"))

    def _on_chunks(self, via: int, msg: p.Message) -> list[Out]:
        """One step's deltas for several requests."""
        try:
            parts = p.split_chunks(msg)
        except p.ProtocolError:
            return []  # garbled: its requests' ENDs (or silence budgets) still come
        stale = []
        for rid, data in parts:
            if (pend := self.pending.get(rid)) is not None:
                if pend.via != via:
                    stale.append((via, p.cancel(rid)))
                else:
                    self._on_data(rid, pend, data, [], final=False)
        return stale

    def _on_reply(self, via: int, msg: p.Message) -> list[Out]:
        """A CHUNK, END or ERROR of one request."""
        rid = msg.header.get("id")
        pend = self.pending.get(rid) if isinstance(rid, str) else None
        if pend is None:
            return []
        if pend.via != via:  # a broker we gave up on came back: its copy is not wanted
            return [(via, p.cancel(rid))] if msg.type == p.CHUNK else []
        if msg.type == p.ERROR:
            h = msg.header
            # a lost worker, or a broker that dropped the job (it thought us gone): go on
            lost = {p.WORKER_LOST: "worker lost", p.UNAVAILABLE: "dropped by the broker"}
            why = lost.get(h.get("code"))  # type: ignore[call-overload]
            if why and self._resume(rid, pend, why):
                return [(pend.via, pend.frames)]
            del self.pending[rid]
            pend.sink.put(errors.from_code(str(h.get("code")), str(h.get("message")), rid))
            return []
        try:
            data = p.body(msg)
        except p.ProtocolError as exc:  # a garbled reply fails its request, not the client
            del self.pending[rid]
            pend.sink.put(errors.InternalError(f"malformed reply: {exc}", rid))
            return []
        self._on_data(rid, pend, data, msg.buffers[1:], final=msg.type == p.END)
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

    def _on_epoch(self, via: int, epoch: Any) -> list[Out]:
        """A broker heartbeat: a new epoch is a new broker process, which knows none of the
        requests we sent it. Send them all again, marked `again`; generations that streamed
        resume from what they received; what started and cannot resume fails
        (UnavailableError)."""
        mine = [(rid, pend) for rid, pend in self.pending.items()
                if pend.via == via and pend.sent]
        if not self.brokers.new_epoch(via, epoch) or not mine:
            return []
        log.warning("broker %s restarted (epoch %s): sending %d requests again",
                    self.brokers.all[via].endpoint, epoch, len(mine))
        out = []
        for rid, pend in mine:
            if pend.started and not self._resume(rid, pend, "broker restarted", count=False):
                del self.pending[rid]
                pend.sink.put(errors.UnavailableError("broker restarted mid-stream", rid))
                out.append((via, p.cancel(rid)))  # in case it reached the new broker
                continue
            if pend.frames[1] == p.REQUEST:
                pend.frames = p.again(pend.frames)
            out.append((via, pend.frames))
        return out

    def heartbeats_due(self, now: float) -> list[Out]:
        return [(i, p.encode(p.HEARTBEAT, {})) for i in self.brokers.beats_due(now)]

    def brokers_lost(self, now: float) -> list[int]:
        """Brokers silent past their expiry, or whose connection dropped: the client opens
        each one's socket again, then sends what `failover` returns."""
        return self.brokers.lost(now)

    def failover(self, lost: int) -> list[Out]:
        """Broker `lost` went silent (or away): its requests move to another live broker (the
        same one, once reconnected, when none is). Requests that streamed nothing are resent
        (up to max_resends times), generations that had started resume; the others fail with
        UnavailableError, as do those that ran out of resends: nothing waits forever."""
        now = time.monotonic()
        mine = [(rid, pend) for rid, pend in self.pending.items() if pend.via == lost]
        to = self.brokers.other(lost, now)
        if mine:
            log.warning("broker %s lost: %d requests %s", self.brokers.all[lost].endpoint,
                        len(mine), f"go on through {self.brokers.all[to].endpoint}"
                        if to != lost else "sent again as it reconnects")
        out = []
        for rid, pend in mine:
            if not pend.sent:  # its first send is still to come: it goes there instead
                pend.via = to
                continue
            if (pend.started and pend.resent < self.cfg.max_resends
                    and self._resume(rid, pend, "broker lost", count=False)):
                pend.resent += 1
            elif pend.started or pend.resent >= self.cfg.max_resends:
                del self.pending[rid]
                why = "broker lost mid-stream" if pend.started else "no broker answered"
                pend.sink.put(errors.UnavailableError(why, rid))
                continue
            else:
                pend.resent += 1
            if pend.frames[1] == p.REQUEST:  # a broker that holds it already (one that was
                pend.frames = p.again(pend.frames)  # only silent) does not run it twice
            pend.via = to
            out.append((to, pend.frames))
        return out

    @property
    def broker_alive(self) -> bool:
        """Heard from a broker within heartbeat x liveness."""
        return self.brokers.alive

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
    if params.get("n", 1) != 1:
        raise errors.BadRequestError("n > 1 is n requests: generate() and chat() send them; "
                                     "submit() sends one")
    params = {k: v for k, v in params.items() if k != "n"}
    return params if prompt is None else {"prompt": prompt, **params}


SUBMIT_KEYWORDS = frozenset({"buffers", "request_id", "resume", "tenant", "trace"})  # submit's own


def generation_params(params: dict[str, Any]) -> dict[str, Any]:
    """The keywords of generate, stream and chat: a generation's fields only
    (contract.SDK_FIELDS), so a typo is a BadRequestError naming it (and the field it may
    mean) before anything is sent. submit() takes any engine's body (echo, tensor)."""
    if (odd := contract.unknown_fields(params, contract.SDK_FIELDS | SUBMIT_KEYWORDS)) is not None:
        raise errors.BadRequestError(odd)
    return params


def choice_params(params: dict[str, Any]) -> list[dict[str, Any]]:
    """A call's parameters for each of its `n` choices (1 by default): choice i of a seeded
    call is seeded seed + i, as the gateway's are."""
    n = generation_params(params).get("n", 1)
    try:
        contract.NUMBERS["n"].check("n", n)
    except ValueError as exc:
        raise errors.BadRequestError(str(exc)) from None
    return contract.choices({k: v for k, v in params.items() if k != "n"}, n)
