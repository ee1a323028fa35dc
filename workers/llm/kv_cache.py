"""The engine's KV cache: one preallocated slot of max_model_len positions per sequence.

Per layer, K and V are [num_slots, kv_heads, max_model_len, head_dim]. A sequence owns one
slot from admission to finish, so admission never over-commits: `can_allocate` is true only
while a slot is free, and a request longer than max_model_len is refused up front. Free slots
are handed out lowest first, which keeps the decode batch's slots dense.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_slots, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def used(self) -> int:
        return self.num_slots - len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        assert 0 <= slot < self.num_slots and slot not in self._free, slot
        heapq.heappush(self._free, slot)
