"""Attention over the engine's own KV cache, plugged into transformers' model code.

The engine runs the model on a *packed* batch: every scheduled sequence's new tokens side by
side in one [1, N] row, with explicit position ids. transformers computes projections, RoPE,
norms and MLPs as usual and calls this function for attention (registered through its
AttentionInterface). Here each layer writes the new keys and values into their slots, then:
- decode tokens (one per running sequence, first in the row) attend as one batched SDPA over
  the dense range of slots they occupy, masked to each sequence's length;
- prefill chunks attend one sequence at a time: causal over the chunk plus its cached prefix.
The batch layout lives in a ForwardContext set by the model runner around each forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

NAME = "zeroserve_paged"


@dataclass
class ForwardContext:
    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    slot_of_token: torch.Tensor  # [N] slot each packed token writes to
    pos_of_token: torch.Tensor  # [N] its position in its sequence
    num_decode: int = 0  # tokens [0, num_decode) are decodes, one per sequence
    decode_slots: torch.Tensor | None = None  # [num_decode]
    decode_hi: int = 0  # slots [0, decode_hi) cover every decoding sequence
    decode_len: int = 0  # longest decoding context
    decode_mask: torch.Tensor | None = None  # [decode_hi, 1, 1, decode_len] bool
    decode_dense: bool = False  # decode slots are exactly 0..num_decode-1 in order
    prefills: list[tuple[int, int, int, int]] = field(default_factory=list)  # a, b, slot, start


_ctx: ForwardContext | None = None


def set_context(ctx: ForwardContext | None) -> None:
    global _ctx
    _ctx = ctx


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0,
                    **kwargs: object) -> tuple[torch.Tensor, None]:
    ctx = _ctx
    assert ctx is not None, "paged_attention called outside a zeroserve forward"
    layer = module.layer_idx
    kc, vc = ctx.k_cache[layer], ctx.v_cache[layer]  # [S, Hkv, L, D]
    _, heads, n_tok, head_dim = query.shape  # [1, H, N, D]
    gqa = heads != key.shape[1]
    # write this step's keys and values into their slots: [N, Hkv, D]
    kc[ctx.slot_of_token, :, ctx.pos_of_token] = key[0].transpose(0, 1)
    vc[ctx.slot_of_token, :, ctx.pos_of_token] = value[0].transpose(0, 1)
    out = query.new_empty(1, n_tok, heads, head_dim)  # [1, N, H, D]
    nd = ctx.num_decode
    if nd:
        hi, length = ctx.decode_hi, ctx.decode_len
        q_dec = query[0, :, :nd].transpose(0, 1).unsqueeze(2)  # [nd, H, 1, D]
        if not ctx.decode_dense:
            padded = query.new_zeros(hi, heads, 1, head_dim)
            padded[ctx.decode_slots] = q_dec
            q_dec = padded
        o = F.scaled_dot_product_attention(  # [hi, H, 1, D]
            q_dec, kc[:hi, :, :length], vc[:hi, :, :length], attn_mask=ctx.decode_mask,
            scale=scaling, enable_gqa=gqa)
        out[0, :nd] = (o if ctx.decode_dense else o[ctx.decode_slots])[:, :, 0]
    for a, b, slot, start in ctx.prefills:
        q = query[:, :, a:b]  # [1, H, n, D]
        if start == 0:
            o = F.scaled_dot_product_attention(
                q, key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling,
                enable_gqa=gqa)
        else:
            end = start + (b - a)
            mask = torch.ones(b - a, end, dtype=torch.bool, device=query.device).tril(start)
            o = F.scaled_dot_product_attention(
                q, kc[slot:slot + 1, :, :end], vc[slot:slot + 1, :, :end], attn_mask=mask,
                scale=scaling, enable_gqa=gqa)
        out[0, a:b] = o[0].transpose(0, 1)
    return out, None


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, paged_attention)
    return NAME
