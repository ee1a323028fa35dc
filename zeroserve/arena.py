"""Shared-memory tensor arenas: tensors cross processes as a small descriptor, never as bytes.

Each producing process owns an arena: a sealed memfd named `zs-{instance}-{pid}-{fd}`, created
on first use (memfd_create), sized once and sealed against shrinking or growing, and mapped
with mmap. Other processes of the same user open it as /proc/{pid}/fd/{fd}. The owner carves
slabs out of it in power-of-two size classes and reuses them (a pool): steady traffic
allocates no new shared memory.

    +-------------------------------+--------+--------+-----
    | slab headers (MAX_SLABS x 32) | slab 0 | slab 1 | ...
    +-------------------------------+--------+--------+-----
    header: u32 state (0 free, 1 leased), u32 generation, u64 capacity, u64 offset, u64 token

A descriptor {arena, slab, gen, token, offset, nbytes, dtype, shape} travels in a msgpack
body. It is honoured only if its slab is leased under the descriptor's token: a random 64-bit
key drawn for that one lease, which only its recipient learns (so a peer that once received a
descriptor from this arena can read nothing else in it: Triton's registered regions, without
the extra round trip), and if it points inside its own slab. The consumer opens the arena,
checks (fstat, F_GET_SEALS) that it is a file of its own uid that nobody can shrink (the seal:
a mapping of it can never fault with SIGBUS, whatever its owner or anyone else does), maps it
once, views the tensor in place (torch.frombuffer), and releases the slab by writing state 0
into its header, with that same token: no message goes back. The owner reuses a slab once its
local tensor is gone and the consumer released it, or once a lease outlives lease_timeout_s (a
dead consumer). A generation bump on every reuse makes a stale descriptor fail validation
instead of reading someone else's data. Mappings of arenas whose owner is gone are dropped
every few seconds.

Who can map whose arena: `shm_domain()` names the processes that can (host boot, pid
namespace, uid). A request carries its client's domain; a worker in another domain (another
host, its own pid namespace, another uid) refuses shared-memory inputs with SHM_UNREACHABLE,
which the SDK answers by sending frames, and replies with frames itself.

Hygiene: nothing to clean. A memfd lives while its owner or a mapping holds it, so an owner's
exit, kill -9 included, leaves nothing behind in /dev/shm or anywhere.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hmac
import math
import mmap
import os
import re
import secrets
import stat
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from zeroserve.config import MIB, instance_name

SHM_DIR = "/dev/shm"  # where arenas of earlier versions lived (chaos checks it stays clean)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MAX_SLABS = 4096
HEADER = struct.Struct("<IIQQQ")  # state, generation, capacity, offset, lease token
HEADERS_BYTES = MAX_SLABS * HEADER.size
FORGET_EVERY_S = 5.0  # how often a consumer drops mappings of arenas that are gone
MIN_CLASS = 4096
FREE, LEASED = 0, 1
NAME_RE = re.compile(r"^zs-[A-Za-z0-9_.-]{1,64}-(\d{1,10})-(\d{1,6})$")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@functools.cache
def shm_domain() -> str:
    """Processes with the same domain can map each other's arenas: same boot of the same host,
    same pid namespace (/proc/PID names the same process), same uid."""
    from zeroserve.procs import boot_id

    return f"{boot_id()}:{os.stat('/proc/self/ns/pid').st_ino}:{os.getuid()}"


class DescriptorError(ValueError):
    """A descriptor that does not point at a valid tensor: answered with BAD_REQUEST."""


def prefix(instance: str | None = None) -> str:
    return f"zs-{instance or instance_name()}"


def _class_of(nbytes: int) -> int:
    return max(MIN_CLASS, 1 << math.ceil(math.log2(max(nbytes, 1))))


@dataclass(slots=True)
class _Slab:
    index: int
    offset: int
    capacity: int
    gen: int = 0
    token: int = 0  # the current lease's: only a release that quotes it counts
    local: bool = False  # a tensor in this process still views it
    leased_at: float = 0.0  # when a descriptor for it was last sent


class Arena:
    """The owner's side: allocate slabs, describe them, take them back."""

    def __init__(self, size_bytes: int = 1024 * MIB, lease_timeout_s: float = 60.0,
                 instance: str | None = None) -> None:
        self.instance = instance
        self.name = ""  # zs-{instance}-{pid}-{fd}, once opened
        self._fd = -1
        self.size = size_bytes
        self.lease_timeout_s = lease_timeout_s
        self._lock = threading.Lock()
        self._mm: mmap.mmap | None = None
        self._buf: memoryview | None = None
        self._base = 0
        self._top = HEADERS_BYTES
        self._slabs: list[_Slab] = []
        self._free: dict[int, list[_Slab]] = {}
        self._busy: dict[int, _Slab] = {}  # index -> slab that is local or leased
        self.allocations = 0  # new slabs carved (steady state: stays flat)

    @property
    def path(self) -> str:
        """Where other processes open it."""
        return f"/proc/{os.getpid()}/fd/{self._fd}"

    def _open(self) -> memoryview:
        if self._buf is None:
            fd = os.memfd_create(prefix(self.instance), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, self.size)  # sparse: pages appear when touched
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)  # its size is fixed for good
                self._mm = mmap.mmap(fd, self.size)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            self.name = f"{prefix(self.instance)}-{os.getpid()}-{fd}"
            self._buf = memoryview(self._mm)
            self._base = _address(self._buf)
            atexit.register(self.close)
        return self._buf

    def empty(self, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor living in the arena: fill it, then send it without a copy."""
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            slab = self._alloc(nbytes)
            buf = self._buf
            assert buf is not None
            view = buf[slab.offset:slab.offset + max(nbytes, 1)]
            slab.local = True
        tensor = torch.frombuffer(view, dtype=torch.uint8)[:nbytes].view(dtype).reshape(shape)
        weakref.finalize(tensor, self._local_done, slab.index, slab.gen)
        return tensor

    def owns(self, tensor: torch.Tensor) -> bool:
        if self._mm is None or tensor.device.type != "cpu":
            return False
        return self._base <= tensor.data_ptr() < self._base + self.size

    def describe(self, tensor: torch.Tensor) -> dict[str, Any]:
        """Descriptor for an arena tensor; marks its slab leased until the consumer releases."""
        if not tensor.is_contiguous():
            raise ValueError("only contiguous tensors can be described")
        offset = tensor.data_ptr() - self._base
        with self._lock:
            slab = next((s for s in self._busy.values()
                         if s.offset <= offset < s.offset + s.capacity), None)
            if slab is None:
                raise ValueError("tensor is not in a live slab of this arena")
            slab.leased_at = time.monotonic()
            slab.token = secrets.randbits(64) or 1
            self._set_header(slab, LEASED)
        return {"arena": self.name, "slab": slab.index, "gen": slab.gen,
                "token": slab.token, "offset": offset,
                "nbytes": tensor.numel() * tensor.element_size(),
                "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}

    def put(self, tensor: torch.Tensor) -> dict[str, Any]:
        """Copy a tensor into the arena (the one copy) and describe it."""
        dst = self.empty(tuple(tensor.shape), tensor.dtype)
        dst.copy_(tensor)
        return self.describe(dst)

    def revoke(self, desc: dict[str, Any]) -> None:
        """Take back a lease its consumer will never release (it could not map this arena)."""
        with self._lock:
            slab = self._busy.get(desc.get("slab"))  # type: ignore[arg-type]
            if slab is not None and (slab.gen, slab.token) == (desc.get("gen"),
                                                                desc.get("token")):
                self._set_header(slab, FREE)

    def close(self) -> None:
        with self._lock:
            if self._buf is None:
                return
            self._buf.release()
            self._buf = None
            with contextlib.suppress(BufferError, ValueError):
                self._mm.close()  # type: ignore[union-attr]
            os.close(self._fd)  # consumers' mappings keep the memory until they drop them

    # -- the pool ------------------------------------------------------------------------

    def _alloc(self, nbytes: int) -> _Slab:
        buf = self._open()
        cls = _class_of(nbytes)
        free = self._free.setdefault(cls, [])
        if not free:
            self._reclaim(buf)
        if free:
            slab = free.pop()
        else:
            if self._top + cls > self.size or len(self._slabs) >= MAX_SLABS:
                raise MemoryError(f"arena {self.name} is full ({self.size} bytes)")
            slab = _Slab(len(self._slabs), self._top, cls)
            self._slabs.append(slab)
            self._top += cls
            self.allocations += 1
        slab.gen += 1
        self._set_header(slab, FREE)
        self._busy[slab.index] = slab
        return slab

    def _reclaim(self, buf: memoryview) -> None:
        """Return slabs nobody uses any more to the pool (and expire stuck leases)."""
        now = time.monotonic()
        for slab in list(self._busy.values()):
            if slab.local:
                continue
            state, gen, *_ = HEADER.unpack_from(buf, _header_at(slab.index))
            if state == FREE or gen != slab.gen or now - slab.leased_at > self.lease_timeout_s:
                del self._busy[slab.index]
                self._free.setdefault(slab.capacity, []).append(slab)

    def _local_done(self, index: int, gen: int) -> None:
        with self._lock:
            slab = self._busy.get(index)
            if slab is not None and slab.gen == gen:
                slab.local = False
                if slab.leased_at == 0.0:  # never sent: straight back to the pool
                    del self._busy[index]
                    self._free.setdefault(slab.capacity, []).append(slab)

    def _set_header(self, slab: _Slab, state: int) -> None:
        if state == FREE:
            slab.leased_at, slab.token = 0.0, 0
        HEADER.pack_into(self._buf, _header_at(slab.index), state, slab.gen, slab.capacity,
                         slab.offset, slab.token)

    def stats(self) -> dict[str, int]:
        return {"slabs": len(self._slabs), "busy": len(self._busy), "allocations": self.allocations}


class Mappings:
    """The consumer's side: map each peer arena once, view tensors in place, release slabs."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, memoryview, int]] = {}  # name -> map, view, fd
        self._lock = threading.Lock()
        self._forgot_at = time.monotonic()

    def _map(self, name: str) -> tuple[memoryview, int]:
        entry = self._maps.get(name)
        if entry is not None:
            return entry[1], entry[2]
        match = NAME_RE.match(name) if isinstance(name, str) else None
        if match is None:
            raise DescriptorError(f"bad arena name {name!r}")
        with self._lock:
            try:  # the owner's memfd, through /proc: only processes of this user reach it
                fd = os.open(_proc_path(match), os.O_RDWR)
            except OSError as exc:
                raise DescriptorError(f"arena {name} cannot be opened: {exc.strerror}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise DescriptorError(f"arena {name} is not a regular file of this user")
                try:
                    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                except OSError:
                    seals = 0
                if seals & SEALS != SEALS:  # a file someone could shrink under our mapping
                    raise DescriptorError(f"arena {name} is not a sealed memfd")
                if st.st_size <= HEADERS_BYTES:
                    raise DescriptorError(f"arena {name} is too small")
                mm = mmap.mmap(fd, st.st_size)
            except BaseException:
                os.close(fd)
                raise
            mv = memoryview(mm)
            self._maps[name] = (mm, mv, fd)  # the fd stays open: forget_missing compares it
            return mv, fd

    def view(self, desc: Any) -> torch.Tensor:
        """The tensor a descriptor points at, without a copy; validated against its slab."""
        if time.monotonic() - self._forgot_at > FORGET_EVERY_S:
            self.forget_missing()
        if not isinstance(desc, dict):
            raise DescriptorError("descriptor must be a map")
        buf, _ = self._map(desc.get("arena"))  # type: ignore[arg-type]
        slab, gen, offset, nbytes, token = (desc.get(k) for k in ("slab", "gen", "offset",
                                                                  "nbytes", "token"))
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64
                   for v in (slab, gen, offset, nbytes, token)):
            raise DescriptorError("slab, gen, offset, nbytes and token must be non-negative "
                                  "integers")
        dtype = DTYPES.get(desc.get("dtype"))  # type: ignore[arg-type]
        shape = desc.get("shape")
        if dtype is None:
            raise DescriptorError(f"unsupported dtype {desc.get('dtype')!r}")
        if not isinstance(shape, list) or len(shape) > 16 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise DescriptorError("shape must be a list of non-negative integers")
        if math.prod(shape) * torch.empty((), dtype=dtype).element_size() != nbytes:
            raise DescriptorError("nbytes does not match dtype and shape")
        if slab >= MAX_SLABS:
            raise DescriptorError("descriptor points outside the arena")
        state, live_gen, capacity, start, live_token = HEADER.unpack_from(buf, _header_at(slab))
        if live_gen != gen:
            raise DescriptorError("stale descriptor: the slab was reused or released")
        if state != LEASED or not hmac.compare_digest(live_token.to_bytes(8, "little"),
                                                      token.to_bytes(8, "little")):
            raise DescriptorError("descriptor does not quote its lease's key")
        if (start < HEADERS_BYTES or offset < start or offset + nbytes > start + capacity
                or offset + nbytes > len(buf)):
            raise DescriptorError("descriptor points outside its slab")
        raw = torch.frombuffer(buf[offset:offset + max(nbytes, 1)], dtype=torch.uint8)
        return raw[:nbytes].view(dtype).reshape(shape)

    def release(self, desc: dict[str, Any]) -> None:
        """Hand a slab back to its owner (a write into the slab's header), only with the
        lease's own token."""
        entry = self._maps.get(desc.get("arena", ""))
        if entry is None:
            return
        buf = entry[1]
        slab, gen, token = desc.get("slab"), desc.get("gen"), desc.get("token")
        if isinstance(slab, int) and 0 <= slab < MAX_SLABS and isinstance(token, int):
            state, live_gen, cap, start, live_token = HEADER.unpack_from(buf, _header_at(slab))
            if live_gen == gen and state == LEASED and token == live_token:
                HEADER.pack_into(buf, _header_at(slab), FREE, live_gen, cap, start, 0)

    def forget_missing(self) -> None:
        """Drop mappings of arenas whose owner is gone (or whose name now means another)."""
        self._forgot_at = time.monotonic()
        for name, (_, _, fd) in list(self._maps.items()):
            try:
                same = os.stat(_proc_path(NAME_RE.match(name))).st_ino == os.fstat(fd).st_ino
            except OSError:
                same = False
            if not same:
                mm, mv, fd = self._maps.pop(name)
                os.close(fd)
                with contextlib.suppress(BufferError):  # tensors may still view it
                    mv.release()
                    mm.close()

    def __len__(self) -> int:
        return len(self._maps)


def _proc_path(match: Any) -> str:
    pid, fd = match.groups()
    return f"/proc/{pid}/fd/{fd}"


def _header_at(slab: int) -> int:
    return slab * HEADER.size


def _address(buf: memoryview | None) -> int:
    assert buf is not None
    return torch.frombuffer(buf[:1], dtype=torch.uint8).data_ptr()
