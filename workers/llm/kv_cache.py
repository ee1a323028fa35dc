"""The engine's KV memory: per layer, a pool of fixed-size blocks for keys and for values.

Per layer, K and V are [num_blocks, block_size, kv_heads, head_dim]. Which sequence owns which
block is the BlockManager's business (block_manager.py); attention.py writes a step's new keys
and values through a flat slot index (block * block_size + offset) and reads a sequence's
context by gathering its block table.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
