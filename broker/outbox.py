"""What the broker owes its clients and could not send yet: a bounded backlog per client.

Sends to a client go out on the broker's frontend ROUTER without blocking. When a client
reads slower than its replies arrive, ZeroMQ first buffers up to the socket's high-water mark
(SocketConfig.hwm messages), then a send fails with EAGAIN. From then on that client's
messages wait here, in order, and the broker flushes them as the client catches up; other
clients are not affected. Only when a client falls `limit` messages behind even this backlog
is it too slow to serve: `send` says OVERFLOW and the broker cancels that client's requests
(`cut`: the CHUNKs (and CHUNKS of only those requests) it was owed for those requests are
dropped, the rest kept, and each
cancelled request gets one ERROR, so the client learns why once it reads again). A message
that may be dropped (a HEARTBEAT echo) is, while a backlog waits. A send that fails for
another reason (EHOSTUNREACH: the client's connection is gone) says GONE.
"""

from __future__ import annotations

import collections
import enum

import zmq

from zeroserve import protocol as p


class Sent(enum.Enum):
    SENT = "sent"
    QUEUED = "queued"  # behind earlier messages of a slow reader
    OVERFLOW = "overflow"  # the backlog is full: this client is too slow
    GONE = "gone"  # the client cannot be reached at all


class Outbox:
    def __init__(self, sock: zmq.Socket, limit: int) -> None:
        self.sock, self.limit = sock, limit
        self.backlog: dict[bytes, collections.deque[list]] = {}

    def send(self, client: bytes, frames: list, droppable: bool = False) -> Sent:
        waiting = self.backlog.get(client)
        if waiting is not None and droppable:
            return Sent.QUEUED  # the client hears from us anyway when it reads its backlog
        if waiting is None:
            try:
                self.sock.send_multipart([client, *frames], zmq.NOBLOCK)
                return Sent.SENT
            except zmq.Again:
                waiting = self.backlog[client] = collections.deque()
            except zmq.ZMQError:
                return Sent.GONE
        if len(waiting) >= self.limit:
            return Sent.OVERFLOW
        waiting.append(frames)
        return Sent.QUEUED

    def cut(self, client: bytes, cancelled: set[str], messages: list[list]) -> None:
        """Drop the CHUNKs the client was owed for the `cancelled` request ids, keep the rest
        (a request that finished keeps every part of its reply), add `messages`: at most
        `limit` in all, the newest."""
        kept = [m for m in self.backlog.get(client, ())
                if not _only_for(m, cancelled)] + messages
        if kept:
            self.backlog[client] = collections.deque(kept[-self.limit:])
            self.flush_one(client)

    def drop(self, client: bytes) -> None:
        self.backlog.pop(client, None)

    def flush(self) -> list[bytes]:
        """Send what each slow client can take now; return the clients found gone."""
        return [c for c in list(self.backlog) if not self.flush_one(c)]

    def flush_one(self, client: bytes) -> bool:
        waiting = self.backlog[client]
        while waiting:
            try:
                self.sock.send_multipart([client, *waiting[0]], zmq.NOBLOCK)
            except zmq.Again:
                return True
            except zmq.ZMQError:
                del self.backlog[client]
                return False
            waiting.popleft()
        del self.backlog[client]
        return True

    def __len__(self) -> int:
        return sum(len(q) for q in self.backlog.values())


def _only_for(frames: list, cancelled: set[str]) -> bool:
    """A streamed part (CHUNK, or CHUNKS) that belongs to cancelled requests only."""
    if frames[1] == p.CHUNK:
        return p.rid_of(frames) in cancelled
    if frames[1] == p.CHUNKS:
        return set(p.unpackb(frames[2], p.HEADER_LIMIT_BYTES)["ids"]) <= cancelled
    return False
