"""CPU pinning: give each worker on a host its own slice of cores.

`--cpus 0-3,8` pins explicitly; otherwise slot `i` of `n` workers gets the i-th even share of
the cores this process may run on. torch's intra-op thread count follows the pinned set.
A worker that may share its cores (unpinned, or more slots than cores) makes its OpenMP
threads wait passively: spinning waiters of two processes on the same cores burn each other's
turns (two tiny workers unpinned on 2 cores: 8.0 ms a forward each, 3.4 ms passive).
`CoreShare` gives a core back to a prepare thread while it does large text work (below).
"""

from __future__ import annotations

import os
import sys


def parse_cpus(spec: str) -> tuple[int, ...]:
    """'0-3,8' -> (0, 1, 2, 3, 8); raises ValueError on anything else."""
    cpus: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"bad cpu range {part!r}")
            cpus.extend(range(lo, hi + 1))
        else:
            cpus.append(int(part))
    if not cpus:
        raise ValueError(f"no cpus in {spec!r}")
    return tuple(sorted(set(cpus)))


def partition(slot: int, slots: int, available: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The cores of worker `slot` among `slots` workers; workers share when cores are few."""
    cores = tuple(sorted(available if available is not None else os.sched_getaffinity(0)))
    if slots <= 0 or not cores:
        return cores
    if slots >= len(cores):
        return (cores[slot % len(cores)],)
    per, extra = divmod(len(cores), slots)
    start = slot * per + min(slot, extra)
    return cores[start:start + per + (1 if slot < extra else 0)]


def pin(cpus: tuple[int, ...]) -> None:
    """Pin this process to `cpus`. Call before torch is imported so its pools size to them."""
    os.sched_setaffinity(0, cpus)


class CoreShare:
    """torch's intra-op threads: all of its cores, but one fewer while a prepare thread does
    large text work (a tokenization of megabytes) on one of them. An OpenMP team waits at each
    parallel region for its slowest thread; with one thread displaced by the tokenizer, a
    tiny model's 4 ms step took 80-120 ms and another tenant's TTFT p99 went from 15 to 110 ms
    (zeroserve bench isolation); stepping on one core fewer, it stays at 15-33 ms."""

    def __init__(self) -> None:
        self.full = 0  # torch's thread count as it loaded (0: not loaded yet)
        self.narrow = False

    def update(self, heavy_text_work: bool) -> None:
        """Before a step: narrow (or widen back) torch's team. No torch loaded: nothing."""
        if heavy_text_work == self.narrow:
            return
        torch = sys.modules.get("torch")
        if torch is None:
            return
        self.full = self.full or torch.get_num_threads()
        if self.full > 1:
            torch.set_num_threads(self.full - 1 if heavy_text_work else self.full)
            self.narrow = heavy_text_work


def wait_passively_if_shared(pinned: bool, slots: int) -> bool:
    """Before torch loads: OpenMP waiters sleep instead of spinning when this worker may share
    its cores with other processes (unless the operator set OMP_WAIT_POLICY). True if set."""
    shared = not pinned or slots > len(os.sched_getaffinity(0))
    if not shared or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
