"""Which worker holds which prompt prefix: the broker's bounded index for cache-aware routing.

Pure data, no sockets. Each REQUEST may carry prefix hashes (zeroserve/prefix.py: chained, so
one hash stands for all the prompt up to its point). When the broker sends a request to a
worker it records each of its hashes against that worker; the next request whose hashes match
goes to the worker with the deepest match, which has that prefix in its KV cache (unless it
is loaded past the table's threshold: table.py decides). A hash maps to one worker, the last
one sent it: a hot prefix that spilled over follows its newest copy.

Bounded: at most `max_entries` hashes, least recently used evicted first, so client-chosen
hashes cannot grow it; a worker that leaves takes its entries with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class PrefixIndex:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(1, max_entries)
        self.owner: OrderedDict[bytes, bytes] = OrderedDict()  # hash -> worker identity
        self.held: dict[bytes, set[bytes]] = {}  # worker identity -> its hashes

    def __len__(self) -> int:
        return len(self.owner)

    def match(self, hashes: list[bytes], eligible: Callable[[bytes], bool]) -> bytes | None:
        """The worker holding the deepest of `hashes` among those `eligible` accepts."""
        for h in reversed(hashes):
            worker = self.owner.get(h)
            if worker is not None and eligible(worker):
                return worker
        return None

    def record(self, hashes: list[bytes], worker: bytes) -> None:
        """`worker` was sent a request with these prefixes: it holds them now."""
        mine = self.held.setdefault(worker, set())
        for h in hashes:
            old = self.owner.get(h)
            if old is not None and old != worker:
                self.held[old].discard(h)
            self.owner[h] = worker
            self.owner.move_to_end(h)
            mine.add(h)
        while len(self.owner) > self.max_entries:
            h, old = self.owner.popitem(last=False)
            self.held[old].discard(h)

    def forget(self, worker: bytes) -> None:
        """A worker left (purged, drained, disconnected): nothing routes to its entries."""
        for h in self.held.pop(worker, ()):
            if self.owner.get(h) == worker:
                del self.owner[h]
