"""Host <-> device transfers inside an engine step: at most one host synchronisation a step.

On CUDA a plain `torch.tensor(list, device="cuda")` copies from pageable memory, and such a
copy first waits for everything queued on the stream; a `.tolist()` or `.item()` waits too.
Everything the step sends to the GPU goes through `to_device` (pinned host memory and a
non-blocking copy: the host never waits), and everything it reads back through one
`to_host` call (non-blocking copies into pinned memory, then one wait for them all).
On the CPU both are plain conversions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def to_device(data: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (nested) list of numbers as a tensor on `device`, without waiting for the device."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_host(tensors: Sequence[torch.Tensor]) -> list[Any]:
    """The tensors' values as Python lists, read with one synchronisation for them all."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.tolist() for t in tensors]
    staged = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(staged, tensors, strict=True):
        dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [t.tolist() for t in staged]
