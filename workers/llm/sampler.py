"""Token sampling, batched on the logits' device: no per-row loop, no host synchronisation.

Greedy rows take the argmax. Sampled rows are shaped by temperature, top-k and top-p (one
top-k or sort where any row asks) and drawn by inverse CDF: one uniform number per row
against the cumulative sum of its probabilities. The uniform comes from a key derived from
(the request's seed, the token's index), so a seeded request draws the same tokens alone,
inside any batch, after a preemption, or resumed on another worker from the tokens it had
already emitted; the key is computed on the host, so the draw is the same on CPU and CUDA.

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


def uniform(key: int) -> float:
    """The draw in [0, 1) of a key: its top 53 bits."""
    return (key >> 10) * 2.0 ** -53


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
    # one transfer for every row's settings and draw
    meta = to_device([[max(sp.temperature, 1e-5), k, sp.top_p, uniform(draw_seed(*draws[i]))]
                      for i, sp, k in zip(rows, sps, ks, strict=True)], torch.float64, dev)
    idx = to_device(rows, torch.long, dev)
    x = logits[idx].float() / meta[:, :1].float()
    cuts = [k for k in ks if k < vocab]
    if cuts:  # top-k: below each row's k-th largest logit is out (ties at it stay in)
        top = torch.topk(x, max(cuts), dim=-1).values
        kth = top.gather(1, (meta[:, 1:2].long() - 1).clamp_(max=top.shape[-1] - 1))
        kth = kth.masked_fill(meta[:, 1:2] >= vocab, float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if any(sp.top_p < 1.0 for sp in sps):  # the smallest set of likeliest tokens reaching top_p
        desc = torch.sort(probs, dim=-1, descending=True).values
        cum = torch.cumsum(desc, dim=-1)
        reach = torch.minimum(meta[:, 2:3].float(), cum[:, -1:])
        last = torch.searchsorted(cum, reach).clamp_(max=vocab - 1)
        probs = probs.masked_fill(probs < desc.gather(1, last), 0.0)
    # the draw runs over the tokens in id order, whatever the batch asked of other rows
    cdf = torch.cumsum(probs, dim=-1)
    choice = torch.searchsorted(cdf, meta[:, 3:4].float() * cdf[:, -1:], right=True)
    drawn = choice.clamp_(max=vocab - 1)[:, 0]
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
