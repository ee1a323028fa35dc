"""The SDK's view of its brokers: which are live, which process each one is, whom to send to.

No sockets: client_core.py asks it where a request goes and which brokers are due a
heartbeat or lost; the clients (client.py) own one DEALER per broker. Every broker in the
list is active at once (the ZeroMQ guide's Freelance pattern): requests spread over the live
ones, a conversation's turns through one broker (picked by its first prefix hash, so that
broker's prefix index keeps routing them to the worker that has them cached), and a lost
broker's requests move to another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from zeroserve.config import ClientConfig


@dataclass(slots=True)
class Broker:
    endpoint: str
    expiry: float  # lost past this (heard from within heartbeat x liveness, or a grace)
    next_beat: float
    last_heard: float = 0.0  # at start: when it was opened (a grace for the first answer)
    epoch: str | None = None  # the broker process heard from (its heartbeats)
    up: bool = True  # False from its loss until it is heard from again


class Brokers:
    def __init__(self, cfg: ClientConfig) -> None:
        now = time.monotonic()
        self.cfg = cfg
        # a grace period for the first connection; the first heartbeat goes at once, to
        # learn each broker's epoch before any request
        self.all = [Broker(e, now + cfg.expiry_s, now, last_heard=now) for e in cfg.endpoints]
        self._rr = 0

    def heard(self, i: int, now: float) -> None:
        b = self.all[i]
        b.last_heard, b.expiry, b.up = now, now + self.cfg.expiry_s, True

    def live(self, now: float) -> list[int]:
        return [i for i, b in enumerate(self.all) if b.expiry > now]

    def pick(self, prefix: list[bytes], now: float) -> int:
        """Where a new request goes: a live broker (any, when none is), by the request's first
        prefix hash when it has one, else in turn."""
        candidates = self.live(now) or list(range(len(self.all)))
        if prefix:
            return candidates[int.from_bytes(prefix[0][:4], "big") % len(candidates)]
        self._rr += 1
        return candidates[self._rr % len(candidates)]

    def other(self, i: int, now: float) -> int:
        """A live broker other than `i` (`i` itself when there is none: its requests wait
        for it to come back); one lost and not heard from since is not live."""
        live = [j for j in self.live(now) if j != i and self.all[j].up]
        if not live:
            return i
        self._rr += 1
        return live[self._rr % len(live)]

    def beats_due(self, now: float) -> list[int]:
        due = [i for i, b in enumerate(self.all) if now >= b.next_beat]
        for i in due:
            self.all[i].next_beat = now + self.cfg.heartbeat_interval_s
        return due

    def lost(self, now: float) -> list[int]:
        """Brokers silent past their expiry (or whose connection dropped): each gets a new
        grace period, for the socket its client opens again."""
        gone = [i for i, b in enumerate(self.all) if b.expiry <= now]
        for i in gone:
            self.all[i].expiry, self.all[i].up = now + self.cfg.expiry_s, False
        return gone

    def disconnected(self, i: int) -> None:
        """Its connection dropped (a local broker exited): lost now, not heartbeats later."""
        self.all[i].expiry = 0.0

    def new_epoch(self, i: int, epoch: object) -> bool:
        """A heartbeat's epoch: True when it shows broker `i` is a new process (restarted)."""
        b = self.all[i]
        if not isinstance(epoch, str) or epoch == b.epoch:
            return False
        known, b.epoch = b.epoch, epoch
        return known is not None

    @property
    def alive(self) -> bool:
        now = time.monotonic()
        return any(now - b.last_heard < self.cfg.expiry_s for b in self.all)
