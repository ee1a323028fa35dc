"""Per-key rate limits: token buckets for requests per second and tokens per minute, and a
pace for request-body bytes (BodyPace).

A request reserves its prompt estimate plus max_tokens from the token bucket when admitted;
when it finishes, the reservation is trued up to its real usage: what it did not use goes back,
and what it used beyond the estimate (a prompt of more tokens than chars / 4) is charged, the
bucket going into debt if need be, so the key's next requests wait for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Bucket:
    rate_per_s: float
    capacity: float
    level: float = -1.0
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.level < 0:
            self.level = self.capacity

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate_per_s)
            self.stamp = now

    def take(self, amount: float, now: float | None = None) -> float:
        """Take `amount`; 0.0 if granted, else the seconds until it would be."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        if amount <= self.level:
            self.level -= amount
            return 0.0
        if amount > self.capacity:
            return float("inf")
        return (amount - self.level) / self.rate_per_s

    def pace(self, amount: float, now: float | None = None) -> float:
        """Charge `amount` now, into debt if need be; the seconds until the debt is paid."""
        self._refill(time.monotonic() if now is None else now)
        self.level -= amount
        return max(0.0, -self.level / self.rate_per_s)

    def give(self, amount: float) -> None:
        """Put `amount` back (negative: charge it, below zero if need be)."""
        self.level = min(self.capacity, self.level + amount)


class BodyPace:
    """Request-body bytes a second per sender (an API key, or a client address without keys):
    a body past its sender's budget waits, unread, for its turn, so one sender's flood of
    megabyte bodies cannot hold the gateway's event loop (reading, parsing) against the
    others, and costs nothing while it waits (its bytes stay in the kernel's buffers). When
    the table is full, senders whose bucket refilled are forgotten, then (all busy) the
    oldest: it holds at most MAX_SENDERS."""

    MAX_SENDERS = 10_000

    def __init__(self, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self.senders: dict[bytes, Bucket] = {}

    def wait_s(self, sender: bytes, nbytes: int) -> float:
        if self.rate <= 0 or nbytes <= 0:
            return 0.0
        now = time.monotonic()
        bucket = self.senders.get(sender)
        if bucket is None:
            if len(self.senders) >= self.MAX_SENDERS:
                self._forget_idle(now)
            bucket = self.senders[sender] = Bucket(self.rate, self.rate, stamp=now)
        return bucket.pace(nbytes, now)

    def _forget_idle(self, now: float) -> None:
        for sender, bucket in list(self.senders.items()):
            bucket._refill(now)
            if bucket.level >= bucket.capacity:
                del self.senders[sender]
        while len(self.senders) >= self.MAX_SENDERS:
            del self.senders[next(iter(self.senders))]


@dataclass
class Limits:
    rps: float = 0.0  # 0: unlimited
    tpm: float = 0.0


class RateLimiter:
    def __init__(self) -> None:
        self.requests: dict[str, Bucket] = {}
        self.tokens: dict[str, Bucket] = {}

    def admit(self, key_id: str, limits: Limits, tokens: int) -> tuple[float, dict[str, str]]:
        """(seconds to wait, 0 if admitted; x-ratelimit-* headers)."""
        now = time.monotonic()
        headers: dict[str, str] = {}
        wait = 0.0
        req = tok = None
        if limits.rps > 0:
            req = self._bucket(self.requests, key_id, limits.rps, max(1.0, limits.rps))
            wait = req.take(1, now)
        if wait == 0.0 and limits.tpm > 0:
            tok = self._bucket(self.tokens, key_id, limits.tpm / 60, limits.tpm)
            wait = tok.take(tokens, now)
            if wait and req is not None:
                req.give(1)  # not admitted: the request slot goes back
        if req is not None:
            headers["x-ratelimit-limit-requests"] = f"{limits.rps:g}"
            headers["x-ratelimit-remaining-requests"] = str(int(req.level))
        if limits.tpm > 0:
            tok = tok or self._bucket(self.tokens, key_id, limits.tpm / 60, limits.tpm)
            headers["x-ratelimit-limit-tokens"] = f"{limits.tpm:g}"
            headers["x-ratelimit-remaining-tokens"] = str(int(tok.level))
        return wait, headers

    @staticmethod
    def _bucket(buckets: dict[str, Bucket], key_id: str, rate: float, cap: float) -> Bucket:
        bucket = buckets.get(key_id)
        if bucket is None:
            bucket = buckets[key_id] = Bucket(rate, cap)
        return bucket

    def refund(self, key_id: str, tokens: float) -> None:
        """True up a reservation: `tokens` reserved and not used (negative: used beyond it)."""
        bucket = self.tokens.get(key_id)
        if bucket is not None and tokens:
            bucket.give(tokens)
