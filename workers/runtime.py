"""The worker process runtime: DEALERs to the brokers' backends around a busy engine loop.

Connects:  DEALER -> each broker backend in WorkerConfig.broker (links.py).
In:   REQUEST, CANCEL, HEARTBEAT, DRAIN, DISCONNECT   (each behind a route frame)
Out:  READY (after load and warmup), HEARTBEAT {stats}, CHUNKS (a step's deltas for one
      client) or CHUNK, END, ERROR, DRAIN, DISCONNECT

Threads, as vLLM does it, so socket and text work never stall compute:
- the IO thread (links.py) owns one DEALER per broker: it decodes requests into the inbox
  queue, forwards what the engine produced from an inproc PAIR to the broker each request
  came from, heartbeats, and reconnects with backoff when a broker goes silent or away (then
  the engine drops that broker's requests: nobody could receive their replies);
- for engines with a ``prepare`` step (the LLM engine: chat template, tokenization), two
  prepare threads run it between the IO thread and the inbox, so a huge prompt is tokenized
  beside the running batch instead of inside a step, and does not hold up every request
  behind it (tokenizers release the GIL while they work); they take work fairly by tenant and
  keep one thread for other tenants while one sends huge bodies (fair_queue.py); while one
  works on a large body, torch steps on one core fewer (pinning.CoreShare);
- the engine thread (the main thread) drains the inbox between steps and runs ``step()``.
SIGTERM or a DRAIN drains: no new work, in-flight requests finish, DISCONNECT, exit 0.
A step that runs past --progress-timeout-s (a hung engine: the IO thread would go on
heartbeating for it) makes the IO thread send DISCONNECT and exit the process (code 70), so
the broker resumes its requests elsewhere and a supervisor starts it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from zeroserve import procs, tracing
from zeroserve import protocol as p
from zeroserve.config import WorkerConfig
from zeroserve.logs import RateLimitedLog
from zeroserve.workers.engine import (
    Engine,
    EngineError,
    FatalEngineError,
    Output,
    RequestKey,
    UnsupportedModel,
)
from zeroserve.workers.engines import build
from zeroserve.workers.fair_queue import SMALL_BYTES, FairQueue
from zeroserve.workers.links import Links
from zeroserve.workers.pinning import CoreShare

log = logging.getLogger("zeroserve.worker")
errors = RateLimitedLog(log)  # unexpected errors: a request that trips one each time is no flood

MAX_FAILED_STEPS = 5  # consecutive failing steps before the engine is declared dead
PREPARE_THREADS = 2  # one huge prompt's text work never holds up every new request

# Inbox items from the IO (and prepare) thread to the engine thread.
ADD, REJECT, CANCEL, DRAIN, RESET = "add", "reject", "cancel", "drain", "reset"
TRIM_BYTES = 8 * 1024 * 1024  # after a body this big, free heap goes back to the system
PREPARE_NICE = 5  # the prepare threads' niceness: a huge tokenization never starves a step


class Worker:
    def __init__(self, cfg: WorkerConfig, engine: Engine, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.ctx = ctx or zmq.Context.instance()
        self.worker_id = cfg.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.replies_addr = f"inproc://worker-replies-{uuid.uuid4().hex}"
        self.replies = self.ctx.socket(zmq.PAIR)  # engine thread's end
        self.replies.setsockopt(zmq.LINGER, 0)
        self.replies.bind(self.replies_addr)
        self.stop_io = threading.Event()
        self.draining = False
        self.stats: dict[str, Any] = {}
        self.served = 0
        self.step_started: float | None = None  # set while engine.step() runs
        self.links = Links(self)
        self._io = threading.Thread(target=self.links.run, name="worker-io", daemon=True)
        self.running: set[RequestKey] = set()  # added to the engine and not yet ended
        # requests handed to the prepare thread and not yet added; cancels that find one here
        # are held until it arrives (set/discard are atomic under the GIL)
        self.preparing: set[RequestKey] = set()
        # traced requests in flight: [traceparent, arrived ns, first token ns] (tracing.py)
        self.traces: dict[RequestKey, list[Any]] = {}
        self.cancelled_early: set[RequestKey] = set()
        self.prepare_q = FairQueue(PREPARE_THREADS)  # by tenant: fair_queue.py
        self.heavy = [False] * PREPARE_THREADS  # each prepare thread's: large text work now
        self.cores = CoreShare()  # torch steps on a core fewer meanwhile (pinning.py)
        self._prep: list[threading.Thread] = []
        if hasattr(engine, "prepare"):
            self._prep = [threading.Thread(target=self._prepare_loop, args=(i,),
                                           name=f"worker-prepare-{i}", daemon=True)
                          for i in range(PREPARE_THREADS)]
        # what a broker sends (on the IO thread), one handler per message type: True asks
        # the link to register again
        self.from_broker: dict[int, Callable[[bytes, p.Message], bool | None]] = {
            p.REQUEST: self._on_request, p.DISCONNECT: self._on_disconnect,
            p.CANCEL: lambda route, msg: self.inbox.put((CANCEL, (route, msg.header["id"]))),
            p.DRAIN: lambda route, msg: self.inbox.put((DRAIN, False))}

    # -- engine thread -------------------------------------------------------------------

    def drain(self, *_: Any) -> None:
        """SIGTERM: stop taking work and tell the broker; finish what is in flight."""
        self.inbox.put((DRAIN, True))

    def run(self) -> int:
        self.stats = self.engine.stats()  # READY carries them: figures from the first moment
        self._io.start()
        for thread in self._prep:
            thread.start()
        failed_steps = 0
        code = 0
        try:
            while True:
                if not self._take_inbox(block=not self.engine.has_work()):
                    break
                if self.engine.has_work():
                    self.cores.update(any(self.heavy))
                    failed_steps = self._step(failed_steps)
                self.stats = self.engine.stats()
            self._send(b"", p.encode(p.DISCONNECT, {"reason": "drained"}))
        except FatalEngineError as exc:
            log.error("fatal engine error: %s", exc)
            self._emit(self.engine.abort_all(p.INTERNAL, f"worker died: {exc}"))
            self._send(b"", p.encode(p.DISCONNECT, {"reason": f"fatal: {exc}"}))
            code = 1
        finally:
            time.sleep(0.05)  # let the IO thread flush the last replies
            self.stop_io.set()
            self.prepare_q.close()
            self._io.join(timeout=2)
            self.replies.close(0)
            self.engine.close()
            log.info("worker %s exiting: served=%d code=%d", self.worker_id, self.served, code)
        return code

    def _step(self, failed_steps: int) -> int:
        """One engine step; returns the count of consecutive failed steps."""
        try:
            self.step_started = time.monotonic()
            outputs = self.engine.step()
            failed_steps = 0
        except FatalEngineError:
            raise
        except Exception as exc:
            failed_steps += 1
            errors.exception("engine step failed (%d in a row)", failed_steps)
            outputs = self.engine.abort_all(p.INTERNAL, f"engine error: {exc}")
            if failed_steps >= MAX_FAILED_STEPS:
                self._emit(outputs)
                raise FatalEngineError(f"{failed_steps} failed steps: {exc}") from exc
        finally:
            self.step_started = None
        self._emit(outputs)
        return failed_steps

    def _take_inbox(self, block: bool) -> bool:
        """Apply inbox items; block briefly when idle. False once a drain has completed."""
        try:
            item = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
        except queue.Empty:
            return not (self.draining and not self.engine.has_work() and not self.preparing)
        while True:
            self._apply(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
        return not (self.draining and not self.engine.has_work() and not self.preparing)

    def _apply(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        if kind in (ADD, REJECT):
            key = item[1]
            self.preparing.discard(key)
            if key in self.cancelled_early:
                self.cancelled_early.discard(key)
                self._emit([Output(key, finish={"finish_reason": "cancelled", "usage": {
                    "prompt_tokens": 0, "completion_tokens": 0}})])
                return
        if kind == REJECT:
            self._emit([Output(item[1], error=item[2])])
        elif kind == ADD:
            _, key, body, buffers = item
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request %s accepted", key[1])
            try:
                self.engine.add(key, p.decode_body(body) if isinstance(body, bytes) else body,
                                buffers)
                self.running.add(key)
            except p.ProtocolError as exc:
                self._emit([Output(key, error=(p.BAD_REQUEST, str(exc)))])
            except EngineError as exc:
                self._emit([Output(key, error=(exc.code, str(exc)))])
            except Exception as exc:
                errors.exception("engine rejected request %s", key[1])
                self._emit([Output(key, error=(p.INTERNAL, f"{type(exc).__name__}: {exc}"))])
            if isinstance(body, bytes) and len(body) > TRIM_BYTES:
                procs.give_memory_back()
        elif kind == CANCEL:
            outs = self.engine.cancel(item[1])
            if not outs and item[1] in self.preparing:
                self.cancelled_early.add(item[1])
            self._emit(outs)
        elif kind == DRAIN:
            if not self.draining:
                self.draining = True
                log.info("draining: %s", "SIGTERM" if item[1] else "broker asked")
                self._send(b"", p.encode(p.DRAIN, {}))  # every broker stops sending work
        elif kind == RESET:  # a broker is gone: its requests, running or in preparation
            _, tag, preparing = item
            self.cancelled_early |= preparing & self.preparing
            gone = [key for key in self.running if key[0][:1] == tag]
            for key in gone:
                self._emit(self.engine.cancel(key))
            if gone:
                log.warning("dropped %d requests of a broker that is gone", len(gone))

    def _emit(self, outputs: list[Output]) -> None:
        """Send what a step produced: with `coalesce`, each client's plain deltas as one
        CHUNKS message (per MAX_CHUNK_IDS), then the rest one message each."""
        if self.cfg.coalesce and len(outputs) > 1:
            outputs = self._send_coalesced(outputs)
        for out in outputs:
            route, rid = out.key
            if self.traces and out.key in self.traces:
                self._trace(out)
            if out.error is not None or out.finish is not None:
                self.running.discard(out.key)
            if out.error is not None:
                self._send(route, p.error(rid, *out.error))
                self.served += 1
            elif out.finish is not None:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("request %s finished: %s", rid, out.finish.get("finish_reason"))
                payload = {**out.delta, **out.finish} if out.delta else out.finish
                self._send(route, p.end(rid, payload, *out.buffers))
                self.served += 1
            elif out.delta is not None:
                self._send(route, p.chunk(rid, out.delta, *out.buffers))

    def _send_coalesced(self, outputs: list[Output]) -> list[Output]:
        """Send the plain deltas of clients with several as CHUNKS; return the others."""
        by_route: dict[bytes, list[Output]] = {}
        rest: list[Output] = []
        for out in outputs:
            plain = out.delta is not None and out.finish is None and out.error is None
            (by_route.setdefault(out.key[0], []) if plain and not out.buffers
             else rest).append(out)
        for route, outs in by_route.items():
            if len(outs) == 1:
                rest.append(outs[0])
                continue
            for out in outs:
                if self.traces and out.key in self.traces:
                    self._trace(out)
            for i in range(0, len(outs), p.MAX_CHUNK_IDS):
                part = outs[i:i + p.MAX_CHUNK_IDS]
                self._send(route, p.chunks([o.key[1] for o in part],
                                           [o.delta for o in part]))  # type: ignore[misc]
        return rest

    def _trace(self, out: Output) -> None:
        """Note a traced request's first token; at its end, record its spans (tracing.py)."""
        span = self.traces[out.key]
        if not span[2] and out.delta and out.delta.get("token_ids"):
            span[2] = tracing.now_ns()
        if out.finish is not None or out.error is not None:
            tracing.worker_spans(*self.traces.pop(out.key), out.finish, self.worker_id)

    def _send(self, route: bytes, frames: list[Any]) -> None:
        self.replies.send_multipart([route, *frames], copy=False)

    # -- prepare thread ------------------------------------------------------------------

    def _prepare_loop(self, slot: int) -> None:
        prepare = self.engine.prepare  # type: ignore[attr-defined]
        with contextlib.suppress(OSError, AttributeError):  # text work yields the cores to
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARE_NICE)  # steps
        while (item := self.prepare_q.get()) is not None:
            tenant, (key, raw, buffers) = item
            self.heavy[slot] = len(raw) > SMALL_BYTES  # the engine steps on a core fewer
            try:
                self.inbox.put((ADD, key, prepare(p.decode_body(raw)), buffers))
            except p.ProtocolError as exc:
                self.inbox.put((REJECT, key, (p.BAD_REQUEST, str(exc))))
            except EngineError as exc:
                self.inbox.put((REJECT, key, (exc.code, str(exc))))
            except Exception as exc:
                errors.exception("preparing request %s failed", key[1])
                self.inbox.put((REJECT, key, (p.INTERNAL, f"{type(exc).__name__}: {exc}")))
            finally:
                self.heavy[slot] = False
                self.prepare_q.done(tenant)
                if len(raw) > TRIM_BYTES:
                    procs.give_memory_back()

    # -- IO thread -----------------------------------------------------------------------

    def ready_header(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "models": list(self.engine.models),
            "capacity": self.engine.capacity,
            "slots": self.engine.capacity,  # links.py sends each broker its share as capacity
            **procs.identity(),  # pid, boot_id, started: lets a local broker watch the pid
            "host": socket.gethostname(),
            "cpus": list(self.cfg.cpus),
            "device": self.engine.device,
            "engine": self.cfg.engine.name,
            "stats": self.beat(),
        }

    def broker_lost(self, tag: bytes) -> None:
        """A broker is gone: what it gave us is cancelled (nobody could receive it)."""
        self.inbox.put((RESET, tag, frozenset(k for k in self.preparing if k[0][:1] == tag)))

    def check_progress(self, tell_all: Any, now: float) -> None:
        started, limit = self.step_started, self.cfg.progress_timeout_s
        if started is None or not limit or now - started <= limit:
            return
        log.error("engine step running for %.1f s (progress timeout %.1f s): exiting so its "
                  "requests resume on another worker", now - started, limit)
        tell_all(p.encode(p.DISCONNECT, {"reason": "engine hung"}))
        time.sleep(0.2)  # let the DISCONNECT leave
        os._exit(70)

    def beat(self) -> dict[str, Any]:
        return {**self.stats, "served": self.served, "draining": self.draining}

    def on_broker(self, frames: list[bytes]) -> bool:
        """Handle one message from the broker; True when it asks us to re-register."""
        route, message = (frames[0] if frames else b""), frames[1:]
        try:
            msg = p.decode(message, self.cfg.sockets.max_message_bytes)
        except p.ProtocolError as exc:
            log.warning("malformed frame from broker: %s", exc)
            return False
        handler = self.from_broker.get(msg.type)
        return bool(handler(route, msg)) if handler is not None else False

    def _on_request(self, route: bytes, msg: p.Message) -> None:
        """The body is decoded on a prepare thread (or the engine's), not here."""
        key = (route, msg.header["id"])
        if "trace" in msg.header and tracing.enabled():
            self.traces[key] = [msg.header["trace"], tracing.now_ns(), 0]
        raw = msg.buffers[0] if msg.buffers else b""
        if not self._prep:
            self.inbox.put((ADD, key, raw, msg.buffers[1:]))
        else:
            self.preparing.add(key)
            self.prepare_q.put((route, msg.header.get("tenant", "")),
                               (key, raw, msg.buffers[1:]), len(raw))

    def _on_disconnect(self, route: bytes, msg: p.Message) -> bool:
        reason = msg.header.get("reason", "")
        if reason == "drained" or self.draining:
            return False  # we are leaving anyway
        log.info("broker says disconnect (%s): registering again", reason)
        return True

def serve(cfg: WorkerConfig) -> int:
    """Load and warm the engine, then register with the broker and serve until drained."""
    t0 = time.monotonic()
    try:
        engine = build(cfg)
        engine.warmup()
    except UnsupportedModel as exc:  # exact or refused: never served approximately
        log.error("refusing to serve: %s", exc)
        return 3
    log.info("engine %s ready in %.2fs (models=%s device=%s)", cfg.engine.name,
             time.monotonic() - t0, ",".join(engine.models), engine.device)
    _freeze_gc()
    worker = Worker(cfg, engine)
    signal.signal(signal.SIGTERM, worker.drain)
    signal.signal(signal.SIGINT, worker.drain)
    return worker.run()


def _freeze_gc() -> None:
    """Move startup objects (model, tokenizer) out of the collector's view: cheaper GC passes."""
    import gc

    gc.collect()
    gc.freeze()
