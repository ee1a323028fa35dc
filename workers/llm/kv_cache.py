"""The engine's KV memory: per layer, a pool of fixed-size blocks for keys and for values.

Per layer, K and V are [num_blocks, block_size, kv_heads, head_dim]. Layers are grouped by their
sliding window (`plan_groups`): the layers of one group share block ids, so their tensors have
the group's number of blocks. A windowed group only ever holds a window's worth of blocks per
sequence, so it gets no more than its seats can use; the memory that saves goes to the full
layers. Which sequence owns which block is the BlockManager's business (block_manager.py);
attention.py writes a step's new keys and values through a flat slot index (block * block_size
+ offset, per group) and reads a sequence's context by gathering its block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Group:
    window: int | None  # None: full attention
    layers: tuple[int, ...]
    num_blocks: int


def plan_groups(windows: list[int | None], num_blocks: int, block_size: int, seats: int,
                chunk: int) -> list[Group]:
    """Layers grouped by window, full attention first, sized within the memory of
    `num_blocks` blocks in every layer. A windowed group needs at most, per seat, the blocks of
    window - 1 tokens plus two partial ones, and one step's chunk of new tokens besides (plus
    its null block); when full layers exist they take the memory the windowed ones leave."""
    order = sorted(set(windows), key=lambda w: (w is not None, w or 0))
    layers = {w: tuple(i for i, x in enumerate(windows) if x == w) for w in order}
    sizes: dict[int | None, int] = {}
    for w in order:
        if w is not None:
            cap = seats * (-(-(w - 1) // block_size) + 2) + -(-chunk // block_size) + 1
            sizes[w] = min(num_blocks, cap) if None in layers else num_blocks
    if None in layers:
        spare = sum((num_blocks - n) * len(layers[w]) for w, n in sizes.items())
        sizes[None] = num_blocks + spare // len(layers[None])
    return [Group(w, layers[w], sizes[w]) for w in order]


class KVCache:
    def __init__(self, groups: list[Group], block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        num_layers = sum(len(g.layers) for g in groups)
        self.k: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.v: list[torch.Tensor] = [torch.empty(0)] * num_layers
        self.group_of = [0] * num_layers  # layer -> its group's index
        for gi, g in enumerate(groups):
            shape = (g.num_blocks, block_size, kv_heads, head_dim)
            for layer in g.layers:
                self.k[layer] = torch.zeros(shape, dtype=dtype, device=device)
                self.v[layer] = torch.zeros(shape, dtype=dtype, device=device)
                self.group_of[layer] = gi
        self.groups = groups
        self.block_size = block_size

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
