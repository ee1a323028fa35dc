"""Tensors in request and reply bodies: a shared-memory descriptor, or a raw extra frame.

    body["inputs"] = {"x": {"shm": descriptor}}                  same host: zero-copy
    body["inputs"] = {"x": {"frame": 0, "dtype": ..., "shape": ...}}  other host: frame i
                                                                      after the body frame
Frames are sent with copy=False and viewed on arrival with torch.frombuffer: no further copy.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from zeroserve.arena import DTYPE_NAMES, DTYPES, Arena, DescriptorError, Mappings


def as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))  # shares memory
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a torch tensor or numpy array, got {type(value).__name__}")
    if value.dtype not in DTYPE_NAMES:
        raise TypeError(f"unsupported dtype {value.dtype}")
    return value.detach().cpu().contiguous()


def pack(tensors: dict[str, Any], arena: Arena | None) -> tuple[dict[str, Any], list[Any]]:
    """Entries for a body, plus the raw frames to send after the body (frames path)."""
    entries: dict[str, Any] = {}
    frames: list[Any] = []
    for name, value in tensors.items():
        t = as_tensor(value)
        if arena is not None:
            entries[name] = {"shm": arena.describe(t) if arena.owns(t) else arena.put(t)}
        else:
            entries[name] = {"frame": len(frames), "dtype": DTYPE_NAMES[t.dtype],
                             "shape": list(t.shape)}
            frames.append(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return entries, frames


def unpack(entries: Any, frames: list[Any], maps: Mappings) -> dict[str, torch.Tensor]:
    """Tensors from body entries; DescriptorError on anything that does not add up."""
    if not isinstance(entries, dict) or not entries:
        raise DescriptorError("tensors must be a non-empty map of name -> entry")
    out: dict[str, torch.Tensor] = {}
    for name, entry in entries.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise DescriptorError("each tensor entry must be a map")
        if "shm" in entry:
            out[name] = maps.view(entry["shm"])
        elif "frame" in entry:
            out[name] = _from_frame(entry, frames)
        else:
            raise DescriptorError(f"tensor {name!r} has neither shm nor frame")
    return out


def shm_descriptors(entries: Any) -> list[dict[str, Any]]:
    if not isinstance(entries, dict):
        return []
    return [e["shm"] for e in entries.values() if isinstance(e, dict) and "shm" in e]


def _from_frame(entry: dict[str, Any], frames: list[Any]) -> torch.Tensor:
    idx, dtype_name, shape = entry.get("frame"), entry.get("dtype"), entry.get("shape")
    if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(frames):
        raise DescriptorError("frame index out of range")
    dtype = DTYPES.get(dtype_name)  # type: ignore[arg-type]
    if dtype is None:
        raise DescriptorError(f"unsupported dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DescriptorError("shape must be a list of non-negative integers")
    buf = frames[idx]
    buf = buf.buffer if hasattr(buf, "buffer") else buf  # a zmq.Frame received copy=False
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(memoryview(buf)) != nbytes:
        raise DescriptorError("frame size does not match dtype and shape")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # received frames are read-only; nobody writes to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape)
