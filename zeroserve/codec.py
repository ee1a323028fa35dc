"""Tensors in and out of the SDK's requests, without importing torch until a tensor is used.

Same host: inputs go into this client's shared-memory arena and cross as descriptors; outputs
come back as views into the worker's arena (released when the tensor is collected). Remote
broker: raw frames both ways. Nothing here binds or connects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zeroserve.core import Result


class TensorCodec:
    """Tensors in and out of requests: this client's arena for inputs on the same host, the
    mappings of workers' arenas for outputs, raw frames for remote brokers."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.local = all(e.startswith("ipc://") or "//127.0.0.1:" in e or "//localhost:" in e
                         for e in endpoints)
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

    def request(self, inputs: dict[str, Any], shm: bool | None) -> tuple[dict, list]:
        from zeroserve import tensors

        use_shm = self.local if shm is None else shm
        entries, frames = tensors.pack(inputs, self.arena if use_shm else None)
        return {"inputs": entries, "reply": "shm" if use_shm else "frames"}, frames

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
