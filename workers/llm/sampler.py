"""Token sampling, batched on the logits' device: no per-row loop, no host synchronisation.

Greedy rows take the argmax. Sampled rows are shaped by temperature, top-k and top-p (one
top-k or sort where any row asks) and drawn by the Gumbel-max trick: the token with the
largest logit + Gumbel noise, the noise of (row, token) a counter-based hash of the row's key
and the token id. The key is derived from (the request's seed, the token's index) on the
host, so a seeded request draws the same tokens alone, inside any batch, after a preemption,
or resumed on another worker from the tokens it had already emitted, and the same on CPU and
CUDA (integer arithmetic only).

`sample` and `top_logprobs` return device tensors; the engine reads them back together
(transfer.to_host), once a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeroserve.workers.llm.params import SamplingParams
from zeroserve.workers.llm.transfer import to_device

MASK64 = (1 << 64) - 1
M32 = 0xFFFFFFFF


def draw_seed(seed: int, index: int) -> int:
    """The key of token `index` of a request seeded `seed` (splitmix64, 63 bits)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) >> 1


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int64 values in [0, 2**32): a bijection that spreads every bit
    (products wrap past 2**63 as two's complement; the mask keeps the low 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def gumbel(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[R] int64 keys, [R, W] token ids -> [R, W] float32 standard Gumbel noise, a pure
    function of (key, token id): the same in any batch and on any device."""
    lo, hi = (keys & M32)[:, None], (keys >> 32)[:, None]
    h = _mix32(_mix32(((ids * 0x9E3779B1) & M32) ^ lo) ^ hi)
    u = (h.double() + 0.5) * 2.0 ** -32  # in (0, 1)
    return (-torch.log(-torch.log(u))).float()


def sample(logits: torch.Tensor, params: list[SamplingParams],
           draws: list[tuple[int, int]]) -> torch.Tensor:
    """[B, V] logits -> [B] token ids on the logits' device, one per row under that row's
    parameters; a sampled row draws with the key of its (request seed, token index) pair."""
    tokens = torch.argmax(logits, dim=-1)
    rows = [i for i, sp in enumerate(params) if not sp.greedy]
    if not rows:
        return tokens
    dev, vocab = logits.device, logits.shape[-1]
    sps = [params[i] for i in rows]
    ks = [sp.top_k if 0 < sp.top_k < vocab else vocab for sp in sps]  # vocab: no cut
    keys = [draw_seed(*draws[i]) for i in rows]
    # one transfer for every row's settings and key (float64 holds each exactly, the key
    # in two halves)
    meta = to_device([[max(sp.temperature, 1e-5), k, sp.top_p, key & M32, key >> 32]
                      for sp, k, key in zip(sps, ks, keys, strict=True)], torch.float64, dev)
    idx = to_device(rows, torch.long, dev)
    x = logits[idx].float() / meta[:, :1].float()
    cuts = [k for k in ks if k < vocab]
    if cuts:  # top-k: below each row's k-th largest logit is out (ties at it stay in)
        top = torch.topk(x, max(cuts), dim=-1).values
        kth = top.gather(1, (meta[:, 1:2].long() - 1).clamp_(max=top.shape[-1] - 1))
        kth = kth.masked_fill(meta[:, 1:2] >= vocab, float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    if any(sp.top_p < 1.0 for sp in sps):  # the smallest set of likeliest tokens reaching top_p
        probs = torch.softmax(x, dim=-1)
        desc = torch.sort(probs, dim=-1, descending=True).values
        cum = torch.cumsum(desc, dim=-1)
        reach = torch.minimum(meta[:, 2:3].float(), cum[:, -1:])
        last = torch.searchsorted(cum, reach).clamp_(max=vocab - 1)
        x = x.masked_fill(probs < desc.gather(1, last), float("-inf"))
    # Gumbel-max: the largest logit + noise keyed by (row key, token id). A float difference
    # in the logits (another batch, another device) flips a draw only between two near-equal
    # candidates, not wherever a cumulative sum crosses the draw.
    key = (meta[:, 4].long() << 32) | meta[:, 3].long()
    if len(cuts) == len(sps):  # every row keeps at most max(cuts) tokens: noise for those
        x, cols = torch.topk(x, max(cuts), dim=-1)
    else:
        cols = torch.arange(vocab, device=dev).expand(len(rows), -1)
    choice = torch.argmax(x + gumbel(key, cols), dim=-1, keepdim=True)
    drawn = cols.gather(1, choice)[:, 0]
    return tokens.index_copy(0, idx, drawn)


@dataclass
class Logprobs:
    """Device tensors for the rows that asked for logprobs: read back with the step's tokens."""

    rows: list[int]
    counts: list[int]  # alternatives each row asked for
    chosen: torch.Tensor  # [R] the sampled token's logprob
    top_values: torch.Tensor  # [R, kmax]
    top_ids: torch.Tensor  # [R, kmax]

    def tensors(self) -> list[torch.Tensor]:
        return [self.chosen, self.top_values, self.top_ids]

    def entries(self, host: list, tokens: list[int], size: int) -> list[dict | None]:
        """Per row of the step (None where not asked), from `host`: `tensors()` read back."""
        chosen, values, ids = host
        out: list[dict | None] = [None] * size
        for j, (i, k) in enumerate(zip(self.rows, self.counts, strict=True)):
            out[i] = {"token_id": tokens[i], "logprob": chosen[j],
                      "top": [{"token_id": t, "logprob": v}
                              for t, v in zip(ids[j][:k], values[j][:k], strict=True)]}
        return out


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                 n: list[int | None]) -> Logprobs | None:
    """The chosen token's logprob and the top-n alternatives of each row that asks (n set)."""
    rows = [i for i, k in enumerate(n) if k is not None]
    if not rows:
        return None
    idx = to_device(rows, torch.long, logits.device)
    lp = torch.log_softmax(logits[idx].float(), dim=-1)
    counts = [n[i] or 0 for i in rows]
    top = torch.topk(lp, max(counts), dim=-1)
    chosen = lp.gather(1, tokens[idx][:, None])[:, 0]
    return Logprobs(rows, counts, chosen, top.values, top.indices)
