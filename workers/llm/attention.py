"""Attention through block tables, plugged into transformers' model code.

The engine runs the model on a *packed* batch: every scheduled sequence's new tokens side by
side in one [1, N] row, with explicit position ids. transformers computes projections, RoPE,
norms and MLPs as usual and calls `block_attention` for attention (registered through its
AttentionInterface). Per layer it first writes the step's new keys and values into their KV
slots (block * block_size + offset), then:
- single-token rows (decodes) come first, sorted by context length and cut into groups of
  similar length; each group is one batched SDPA over its sequences' gathered blocks, masked to
  each one's length, so the work follows the tokens in use, not the longest context;
- prompt chunks attend one sequence at a time: causal over the chunk itself, or, when the
  sequence already has computed tokens (an earlier chunk or a cached prefix), over its blocks;
  on CUDA, where each call's launches cost more than the arithmetic, the first chunks of
  several sequences go in one call instead, masked causal within each (PackedPrefills).
The batch layout lives in a ForwardContext set by the model runner around each forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NAME = "zeroserve_blocks"


@dataclass
class DecodeGroup:
    a: int  # rows [a, b) of the packed batch: one query token per sequence
    b: int
    blocks: torch.Tensor  # [G, nb] block table of each sequence (padding masked out)
    mask: torch.Tensor | None  # [G, 1, 1, nb * block_size]; None: every context is full
    length: int  # context positions attended (nb * block_size when masked)


@dataclass
class PrefillChunk:
    a: int  # rows [a, b) are positions [start, start + b - a) of one sequence
    b: int
    start: int
    blocks: torch.Tensor | None  # [nb] blocks covering [0, start + b - a); None when start == 0


@dataclass
class PackedPrefills:
    a: int  # rows [a, b) hold several sequences' first chunks, side by side
    b: int
    mask: torch.Tensor  # [b - a, b - a] causal within each chunk, nothing across chunks


@dataclass
class ForwardContext:
    k_cache: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, D]
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [N] flat KV slot each packed token writes to
    k_buf: torch.Tensor  # [rows, block_size * Hkv * D] gather workspaces, reused by every
    v_buf: torch.Tensor  # group and layer (allocating 10s of MiB per call costs page faults)
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    packed: PackedPrefills | None = None


_ctx: ForwardContext | None = None


def set_context(ctx: ForwardContext | None) -> None:
    global _ctx
    _ctx = ctx


def gather(cache: torch.Tensor, blocks: torch.Tensor, length: int,
           buf: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, Hkv, D] cache, [G, nb] block ids -> [G, Hkv, length, D] context,
    copied into the workspace `buf`."""
    g, nb = blocks.shape
    num_blocks, bs, kv_heads, head_dim = cache.shape
    # index_select over whole blocks as rows: a memcpy per block, 3x faster than cache[blocks]
    rows = torch.index_select(cache.view(num_blocks, -1), 0, blocks.flatten(), out=buf[:g * nb])
    return rows.view(g, nb * bs, kv_heads, head_dim)[:, :length].transpose(1, 2)


def block_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: object) -> tuple[torch.Tensor, None]:
    ctx = _ctx
    assert ctx is not None, "block_attention called outside a zeroserve forward"
    layer = module.layer_idx
    kc, vc = ctx.k_cache[layer], ctx.v_cache[layer]
    _, heads, n_tok, head_dim = query.shape  # [1, H, N, D]
    kv_heads = key.shape[1]
    gqa = heads != kv_heads
    kc.view(-1, kv_heads, head_dim)[ctx.slot_mapping] = key[0].transpose(0, 1)  # [N, Hkv, D]
    vc.view(-1, kv_heads, head_dim)[ctx.slot_mapping] = value[0].transpose(0, 1)
    out = query.new_empty(1, n_tok, heads, head_dim)  # [1, N, H, D]
    for g in ctx.decodes:
        q = query[0, :, g.a:g.b].transpose(0, 1).unsqueeze(2)  # [G, H, 1, D]
        o = F.scaled_dot_product_attention(  # [G, H, 1, D]
            q, gather(kc, g.blocks, g.length, ctx.k_buf),
            gather(vc, g.blocks, g.length, ctx.v_buf),
            attn_mask=g.mask, scale=scaling, enable_gqa=gqa)
        out[0, g.a:g.b] = o[:, :, 0]
    if (pk := ctx.packed) is not None:  # one call for many first chunks (CUDA: launches cost)
        o = F.scaled_dot_product_attention(
            query[:, :, pk.a:pk.b], key[:, :, pk.a:pk.b], value[:, :, pk.a:pk.b],
            attn_mask=pk.mask, scale=scaling, enable_gqa=gqa)
        out[0, pk.a:pk.b] = o[0].transpose(0, 1)
    for c in ctx.prefills:
        q = query[:, :, c.a:c.b]  # [1, H, n, D]
        if c.blocks is None:
            o = F.scaled_dot_product_attention(
                q, key[:, :, c.a:c.b], value[:, :, c.a:c.b], is_causal=True, scale=scaling,
                enable_gqa=gqa)
        else:
            end = c.start + (c.b - c.a)
            mask = torch.ones(c.b - c.a, end, dtype=torch.bool, device=query.device).tril(c.start)
            o = F.scaled_dot_product_attention(
                q, gather(kc, c.blocks[None], end, ctx.k_buf),
                gather(vc, c.blocks[None], end, ctx.v_buf),
                attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[0, c.a:c.b] = o[0].transpose(0, 1)
    return out, None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, block_attention)
    return NAME
