"""The tensor engine: serves any torch module built by `--module pkg.mod:factory`.

Request body: {"inputs": {name: tensor entry}, "shm_domain": the sender's (see arena.py)}.
Inputs are batched along dim 0 across requests and passed as keyword arguments to the module;
its output (a tensor or a dict of tensors) is split back per request. END carries
{"outputs": {name: tensor entry}}.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from zeroserve import protocol as p
from zeroserve import tensors
from zeroserve.workers.batching import BatchingEngine, Pending, split_rows
from zeroserve.workers.engine import EngineError


def load_factory(spec: str) -> Any:
    """'pkg.mod:factory' -> factory() (a torch module or any callable)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"--module must look like pkg.mod:factory, got {spec!r}")
    return getattr(importlib.import_module(mod_name), attr)()


class TensorEngine(BatchingEngine):
    def __init__(self, module: Any, model: str, max_batch_size: int = 64,
                 max_queue_delay_ms: float = 2.0, device: str = "cpu") -> None:
        super().__init__(model, max_batch_size, max_queue_delay_ms, device)
        self.module = module.to(device).eval() if isinstance(module, torch.nn.Module) else module

    def parse(self, body: dict[str, Any], frames: list[bytes]) -> tuple[Any, int, list]:
        entries = body.get("inputs")
        inputs = tensors.unpack(entries, frames, self.maps)
        dims = {t.shape[0] if t.dim() else 1 for t in inputs.values()}
        if len(dims) != 1:
            raise EngineError(p.BAD_REQUEST, "all inputs must share their first dimension")
        return inputs, dims.pop(), tensors.shm_descriptors(entries)

    def run(self, batch: list[Pending]) -> list[dict[str, Any]]:
        if len(batch) == 1:  # nothing to merge: the inputs are used where they lie
            inputs = {k: v.to(self.device) for k, v in batch[0].inputs.items()}
        else:
            names = batch[0].inputs.keys()
            if any(r.inputs.keys() != names for r in batch):
                return self._run_one_by_one(batch)
            inputs = {k: torch.cat([r.inputs[k] for r in batch]).to(self.device) for k in names}
        try:
            out = self.module(**inputs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EngineError(p.BAD_REQUEST, f"module rejected the inputs: {exc}") from None
        outs = out if isinstance(out, dict) else {"output": out}
        per_name = {k: split_rows(v.detach().cpu(), batch) for k, v in outs.items()}
        return [{k: parts[i] for k, parts in per_name.items()} for i in range(len(batch))]

    def _run_one_by_one(self, batch: list[Pending]) -> list[dict[str, Any]]:
        return [self.run([r])[0] for r in batch]
