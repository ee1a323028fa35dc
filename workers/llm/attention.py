"""Attention through block tables, plugged into transformers' model code.

The engine runs the model on a *packed* batch: every scheduled sequence's new tokens side by
side in one [1, N] row, with explicit position ids. transformers computes projections, RoPE,
norms and MLPs as usual and calls `block_attention` for attention (registered through its
AttentionInterface). Per layer it first writes the step's new keys and values into their KV
slots (block * block_size + offset), then:
- single-token rows (decodes) come first, sorted by context length and cut into groups of
  similar length; each group is one batched SDPA over its sequences' gathered blocks, masked to
  each one's length, so the work follows the tokens in use, not the longest context (with
  --compile, CPU's default, plain attention's groups run paged_decode.py's kernel instead);
- prompt chunks attend one sequence at a time: causal over the chunk itself, or, when the
  sequence already has computed tokens (an earlier chunk or a cached prefix), over its blocks;
  on CUDA, where each call's launches cost more than the arithmetic, the first chunks of
  several sequences go in one call instead, masked causal within each (PackedPrefills).
The batch layout lives in a ForwardContext set by the model runner around each forward.

Exact or refused: every variant a family passes its attention is honoured, on every path:
`sliding_window` (the layer sees keys at most window - 1 positions back: transformers'
`kv_idx > q_idx - sliding_window`), `softcap` (Gemma 2: tanh-capped logits) and `s_aux`
(gpt-oss: a per-head sink logit in the softmax). A keyword this module does not know, with a
value set, raises UnsupportedAttention: the engine's warmup forward meets it, so such a model
is refused at load, never served approximately.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from zeroserve.workers.engine import UnsupportedModel

NAME = "zeroserve_blocks"
# keywords transformers' attention modules pass that change nothing here (we build our own
# masks from the batch layout, and keep no cache of transformers')
IGNORED = frozenset({"position_ids", "use_cache", "output_router_logits", "output_attentions",
                     "cache_position", "is_causal", "past_key_values", "position_embeddings"})
HONOURED = frozenset({"sliding_window", "softcap", "s_aux"})


class UnsupportedAttention(UnsupportedModel):
    """The model asks its attention for something this engine cannot compute exactly."""


@dataclass
class DecodeGroup:
    a: int  # rows [a, b) of the packed batch: one query token per sequence
    b: int
    blocks: torch.Tensor  # [groups, G, nb] each sequence's block table per KV group
    mask: torch.Tensor | None  # [G, 1, 1, nb * block_size]; None: every context is full
    length: int  # context positions attended (nb * block_size when masked)
    lens: torch.Tensor  # [G] context lengths


@dataclass
class PrefillChunk:
    a: int  # rows [a, b) are positions [start, start + b - a) of one sequence
    b: int
    start: int
    blocks: torch.Tensor | None  # [groups, nb] blocks of [0, start + b - a); None if start == 0


@dataclass
class PackedPrefills:
    a: int  # rows [a, b) hold several sequences' first chunks, side by side
    b: int
    mask: torch.Tensor  # [b - a, b - a] causal within each chunk, nothing across chunks


@dataclass
class ForwardContext:
    k_cache: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, D]
    v_cache: list[torch.Tensor]
    group_of: list[int]  # layer -> its KV group (kv_cache.py)
    slot_mapping: torch.Tensor  # [groups, N] flat KV slot each packed token writes to
    k_buf: torch.Tensor  # [rows, block_size * Hkv * D] gather workspaces, reused by every
    v_buf: torch.Tensor  # group and layer (allocating 10s of MiB per call costs page faults)
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    packed: PackedPrefills | None = None
    # windowed masks built by the first layer that needs them, by (part, index, window)
    masks: dict[tuple, torch.Tensor | None] = field(default_factory=dict)
    windows: dict[int, int | None] = field(default_factory=dict)  # layer -> window it asked
    # paged_decode.CompiledDecode (--compile): the decode groups of plain attention (no
    # softcap, no sinks) go through its kernel instead of a gather and a matmul
    decode_kernel: Callable[..., torch.Tensor] | None = None


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
    unknown = [k for k, v in kwargs.items() if k not in IGNORED | HONOURED
               and v not in (None, False)]
    if unknown:
        raise UnsupportedAttention(f"{type(module).__name__} passes {', '.join(unknown)} to "
                                   "its attention, which zeroserve does not implement")
    window = kwargs.get("sliding_window")
    window = int(window) if isinstance(window, int) and window > 0 else None  # type: ignore[arg-type]
    variant = Variant(scaling, kwargs.get("softcap"), kwargs.get("s_aux"))  # type: ignore[arg-type]
    layer = module.layer_idx
    ctx.windows[layer] = window
    kc, vc = ctx.k_cache[layer], ctx.v_cache[layer]
    gi = ctx.group_of[layer]
    _, heads, n_tok, head_dim = query.shape  # [1, H, N, D]
    kv_heads = key.shape[1]
    slots = ctx.slot_mapping[gi]
    kc.view(-1, kv_heads, head_dim)[slots] = key[0].transpose(0, 1)  # [N, Hkv, D]
    vc.view(-1, kv_heads, head_dim)[slots] = value[0].transpose(0, 1)
    out = query.new_empty(1, n_tok, heads, head_dim)  # [1, N, H, D]
    for i, g in enumerate(ctx.decodes):
        q = query[0, :, g.a:g.b].transpose(0, 1).unsqueeze(2)  # [G, H, 1, D]
        if ctx.decode_kernel is not None and variant.plain:
            o = ctx.decode_kernel(q, kc, vc, g.blocks[gi], g.lens, window or 0,
                                  variant.scale(head_dim), ctx.v_buf)
        else:
            mask = g.mask if window is None else _memo(ctx, ("d", i, window),
                                                       lambda g=g: _decode_window(g, window))
            o = variant.attend(q, gather(kc, g.blocks[gi], g.length, ctx.k_buf),
                               gather(vc, g.blocks[gi], g.length, ctx.v_buf), mask)
        out[0, g.a:g.b] = o[:, :, 0]  # o: [G, H, 1, D]
    if (pk := ctx.packed) is not None:  # one call for many first chunks (CUDA: launches cost)
        mask = pk.mask if window is None else _memo(
            ctx, ("p", 0, window), lambda: pk.mask & _band(pk.b - pk.a, 0, pk.b - pk.a, window,
                                                           query.device))
        o = variant.attend(query[:, :, pk.a:pk.b], key[:, :, pk.a:pk.b],
                           value[:, :, pk.a:pk.b], mask)
        out[0, pk.a:pk.b] = o[0].transpose(0, 1)
    for i, c in enumerate(ctx.prefills):
        q = query[:, :, c.a:c.b]  # [1, H, n, D]
        n = c.b - c.a
        if c.blocks is None:
            mask = None if window is None or window >= n else _memo(
                ctx, ("c", i, window), lambda n=n: _band(n, 0, n, window, query.device))
            o = variant.attend(q, key[:, :, c.a:c.b], value[:, :, c.a:c.b], mask,
                               causal=mask is None)
        else:
            end = c.start + n
            mask = _memo(ctx, ("c", i, window or 0),
                         lambda c=c, n=n, end=end: _band(n, c.start, end, window, query.device))
            o = variant.attend(q, gather(kc, c.blocks[gi, None], end, ctx.k_buf),
                               gather(vc, c.blocks[gi, None], end, ctx.v_buf), mask)
        out[0, c.a:c.b] = o[0].transpose(0, 1)
    return out, None


@dataclass(frozen=True)
class Variant:
    """How one layer turns scores into weights: SDPA's own, or with Gemma 2's logit softcap
    or gpt-oss's sinks, which SDPA cannot express (then written out, as transformers'
    eager attention computes them)."""

    scaling: float | None
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [H] one logit per head

    @property
    def plain(self) -> bool:
        """SDPA's own softmax (what paged_decode computes too)."""
        return self.softcap is None and self.sinks is None

    def scale(self, head_dim: int) -> float:
        return self.scaling if self.scaling is not None else head_dim ** -0.5

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None, causal: bool = False) -> torch.Tensor:
        """q [B, H, Lq, D], k and v [B, Hkv, Lk, D], a boolean mask broadcast to
        [B, H, Lq, Lk] (True: attend) -> [B, H, Lq, D]."""
        gqa = q.shape[1] != k.shape[1]
        if self.plain:
            if q.device.type == "cpu" and q.shape[2] == 1:
                return _one_query_on_cpu(q, k, v, mask, self.scaling)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                  scale=self.scaling, enable_gqa=gqa)
        if gqa:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale(q.shape[-1])  # [B,H,Lq,Lk]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if causal:
            mask = _band(q.shape[2], k.shape[2] - q.shape[2], k.shape[2], None, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if self.sinks is None:
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            sink = self.sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(
                scores.shape[0], -1, scores.shape[2], 1)
            logits = torch.cat([scores, sink], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            weights = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(v.dtype)
        return torch.matmul(weights, v)


def _one_query_on_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """Decode attention on CPU (one query a sequence), written out as transformers' eager
    attention computes it, over K and V copied contiguous: CPU SDPA's kernel for one query
    over the gathered (strided) context took 1.9 ms a call for 16 sequences x 12 heads x 200
    positions in bfloat16, this 0.42 ms with the copy. Query heads that share a KV head are
    one matmul's rows (no repeat of K and V)."""
    b, h, _, d = q.shape
    kv_heads = k.shape[1]
    k, v = k.contiguous(), v.contiguous()
    scale = scaling if scaling is not None else d ** -0.5
    scores = torch.matmul(q.reshape(b, kv_heads, h // kv_heads, d), k.transpose(-1, -2)) * scale
    if mask is not None:  # [B, 1, 1, Lk]: broadcast over heads
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).view(b, h, 1, d)


def _band(n: int, start: int, end: int, window: int | None,
          device: torch.device) -> torch.Tensor:
    """[n, end] causal mask of queries at positions start .. start + n - 1 over keys at
    0 .. end - 1, limited to the last `window` positions (transformers' sliding window:
    kv > q - window) when one is given."""
    q = torch.arange(start, start + n, device=device)[:, None]
    k = torch.arange(end, device=device)[None, :]
    mask = k <= q
    return mask if window is None else mask & (k > q - window)


def _decode_window(g: DecodeGroup, window: int) -> torch.Tensor:
    """[G, 1, 1, L]: each sequence's last `window` context positions (its query is the last
    position, lens - 1)."""
    pos = torch.arange(g.length, device=g.blocks.device)[None, :]  # [1, L]
    lens = g.lens[:, None]
    return ((pos < lens) & (pos >= lens - window))[:, None, None, :]


def _memo(ctx: ForwardContext, key: tuple,
          build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A mask built once per forward and shared by every layer with the same window."""
    mask = ctx.masks.get(key)
    if mask is None:
        mask = ctx.masks[key] = build()
    return mask


def register() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, block_attention)
    return NAME
