"""Tensors in and out of the SDK's requests, without importing torch until a tensor is used.

Same shm domain (arena.shm_domain): inputs go into this client's shared-memory arena and cross as
descriptors; outputs come back as views into the worker's arena (released when the tensor is
collected). Every request quotes this client's domain and each worker decides for itself: one
that cannot map the arena refuses shared-memory inputs (SHM_UNREACHABLE: the SDK resends that
request as frames, and sends frames to that model from then on) and replies with frames.
A broker on another host's address means frames from the start. Nothing here binds or connects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zeroserve.replies import Result


class TensorCodec:
    """Tensors in and out of requests: this client's arena for inputs where workers can map
    it, the mappings of workers' arenas for outputs, raw frames otherwise."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.local = all(e.startswith("ipc://") or "//127.0.0.1:" in e or "//localhost:" in e
                         for e in endpoints)
        self.frames_for: set[str] = set()  # models whose worker could not map this arena
        self._arena: Any = None
        self._maps: Any = None

    @property
    def arena(self) -> Any:
        if self._arena is None:
            from zeroserve.arena import Arena

            self._arena = Arena()
        return self._arena

    @property
    def maps(self) -> Any:
        if self._maps is None:
            from zeroserve.arena import Mappings

            self._maps = Mappings()
        return self._maps

    @property
    def domain(self) -> dict[str, str]:
        """The body field that lets a worker reply through shared memory when it can."""
        from zeroserve.arena import shm_domain

        return {"shm_domain": shm_domain()}

    def request(self, model: str, inputs: dict[str, Any], shm: bool | None
                ) -> tuple[dict, list]:
        """Body fields and frames for `inputs`; shm=False: frames both ways, True: insist."""
        from zeroserve import tensors

        use_shm = (self.local and model not in self.frames_for) if shm is None else shm
        entries, frames = tensors.pack(inputs, self.arena if use_shm else None)
        return {"inputs": entries, **(self.domain if shm is not False else {})}, frames

    def as_frames(self, model: str, inputs: dict[str, Any], body: dict[str, Any],
                  shm: bool | None) -> tuple[dict, list]:
        """A worker could not map this arena (SHM_UNREACHABLE): take the leases back and
        resend as frames, for this model from now on; raise if shm was insisted on."""
        from zeroserve import tensors
        from zeroserve.errors import ShmUnreachableError

        descs = tensors.shm_descriptors(body["inputs"])
        for desc in descs:
            self.arena.revoke(desc)
        if shm or not descs:
            raise ShmUnreachableError(f"a worker of {model!r} cannot map this client's "
                                      "shared memory")
        self.frames_for.add(model)
        return self.request(model, inputs, None)

    def outputs(self, result: Result, copy: bool = False) -> dict[str, Any]:
        """Tensors of a tensor reply. Shared-memory outputs are views; their slabs go back to
        the worker when the tensor is garbage collected (or at once with copy=True)."""
        import weakref

        from zeroserve import tensors

        entries = result.data.get("outputs")
        out = tensors.unpack(entries, result.buffers, self.maps)
        for name, entry in (entries or {}).items():
            if isinstance(entry, dict) and "shm" in entry:
                if copy:
                    out[name] = out[name].clone()
                    self.maps.release(entry["shm"])
                else:
                    weakref.finalize(out[name], self.maps.release, entry["shm"])
        return out
