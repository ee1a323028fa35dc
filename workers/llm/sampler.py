"""Token sampling as small pure functions over a batch of logits (gpt-fast style).

Greedy rows take the argmax. Sampled rows are shaped by temperature, top-k and top-p and drawn
from a generator seeded by (the request's seed, the token's index): counter-based, so a seeded
request draws the same tokens alone, inside any batch, after a preemption, or resumed on
another worker from the tokens it had already emitted.
"""

from __future__ import annotations

import torch
from zeroserve.workers.llm.params import SamplingParams


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int,
                    top_p: float) -> torch.Tensor:
    """[V] logits -> [V] probabilities after temperature, top-k and top-p."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = cum - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_probs)
        probs = probs / probs.sum()
    return probs


MASK64 = (1 << 64) - 1
_generators: dict[torch.device, torch.Generator] = {}


def draw_seed(seed: int, index: int) -> int:
    """The generator seed for token `index` of a request seeded `seed` (splitmix64)."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return (z ^ (z >> 31)) >> 1  # manual_seed takes 63 bits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           draws: list[tuple[int, int]]) -> list[int]:
    """[B, V] logits -> B token ids, one per row under that row's parameters; a sampled row
    draws with the seed of its (request seed, token index) pair in `draws`."""
    tokens = torch.argmax(logits, dim=-1)  # [B]
    sampled = [i for i, sp in enumerate(params) if not sp.greedy]
    if not sampled:
        return tokens.tolist()
    out = tokens.tolist()
    rows = logits[sampled].float()
    gen = _generators.get(rows.device)
    if gen is None:
        gen = _generators[rows.device] = torch.Generator(device=rows.device)
    for j, i in enumerate(sampled):
        sp = params[i]
        probs = logits_to_probs(rows[j], sp.temperature, sp.top_k, sp.top_p)
        gen.manual_seed(draw_seed(*draws[i]))
        out[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    return out


def top_logprobs(logits: torch.Tensor, chosen: list[int], n: list[int | None]
                 ) -> list[dict | None]:
    """Per row: the chosen token's logprob and the top-n alternatives, where n is asked."""
    rows = [i for i, k in enumerate(n) if k is not None]
    out: list[dict | None] = [None] * len(n)
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    for j, i in enumerate(rows):
        k = n[i] or 0
        top = torch.topk(lp[j], k) if k else None
        out[i] = {
            "token_id": chosen[i],
            "logprob": float(lp[j, chosen[i]]),
            "top": [[int(t), float(v)] for v, t in zip(top.values, top.indices, strict=True)]
            if top is not None else [],
        }
    return out
