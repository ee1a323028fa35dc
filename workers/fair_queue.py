"""The worker's prepare queue: text work (templates, tokenization) shared fairly by tenant.

The IO thread puts each request under its tenant (the client connection and the tenant the
request names); the prepare threads take them round-robin across tenants, so one tenant's
burst waits behind nobody's single request. And one thread is kept back: a thread takes a
large job (a body over SMALL_BYTES) of a tenant that already has one in preparation only if
another thread stays free, so a tenant sending huge prompts or /tokenize bodies holds at most
all threads but one, and every other tenant's request starts at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Any

SMALL_BYTES = 64 * 1024  # a body this small is prepared in well under a millisecond


class FairQueue:
    def __init__(self, threads: int, small_bytes: int = SMALL_BYTES) -> None:
        self.threads = threads
        self.small_bytes = small_bytes
        self._queues: OrderedDict[Hashable, deque[tuple[Any, int]]] = OrderedDict()
        self._busy: dict[Hashable, int] = {}  # tenant -> jobs in preparation
        self._cond = threading.Condition()
        self._closed = False

    def put(self, tenant: Hashable, job: Any, nbytes: int) -> None:
        with self._cond:
            self._queues.setdefault(tenant, deque()).append((job, nbytes))
            self._cond.notify()

    def get(self) -> tuple[Hashable, Any] | None:
        """The next job and its tenant (call `done(tenant)` after it); None once closed."""
        with self._cond:
            while not self._closed:
                picked = self._pick()
                if picked is not None:
                    return picked
                self._cond.wait()
            return None

    def _pick(self) -> tuple[Hashable, Any] | None:
        idle = self.threads - sum(self._busy.values())
        for tenant, jobs in self._queues.items():
            job, nbytes = jobs[0]
            if idle > 1 or not self._busy.get(tenant) or nbytes <= self.small_bytes:
                jobs.popleft()
                if jobs:
                    self._queues.move_to_end(tenant)  # round-robin: others go first next
                else:
                    del self._queues[tenant]
                self._busy[tenant] = self._busy.get(tenant, 0) + 1
                return tenant, job
        return None

    def done(self, tenant: Hashable) -> None:
        with self._cond:
            left = self._busy.get(tenant, 0) - 1
            if left > 0:
                self._busy[tenant] = left
            else:
                self._busy.pop(tenant, None)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())
