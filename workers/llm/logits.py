"""Logits processing before sampling: penalties, logit_bias and min_tokens, batched.

For the rows of a step's logits whose requests ask for any of them, in this order (vLLM's
and OpenAI's definitions):

    repetition_penalty  r   each token seen in the prompt or the output: logit / r if
                            positive, logit * r if not (r > 1 discourages repeats)
    frequency_penalty   f   logit - f * (times the token appears in the output)
    presence_penalty    p   logit - p * (1 if the token appears in the output)
    logit_bias          b   logit + b[token]
    min_tokens          m   end-of-sequence and stop tokens at -inf until m tokens are out

Token counts come from one scatter over the padded id lists of those rows; rows that ask for
nothing are not touched (and cost nothing). Pure functions of the logits and each sequence's
parameters and tokens: the same on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from zeroserve.workers.llm.params import SamplingParams


def wanted(sp: SamplingParams) -> bool:
    return bool(sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0
                or sp.logit_bias or sp.min_tokens)


def _counts(rows: Seq[Seq[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, vocab] how many times each token appears in each row's id list."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width + 1), vocab, dtype=torch.long)  # pad: a spare column
    for i, r in enumerate(rows):
        if r:
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    ids = ids.to(device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply(logits: torch.Tensor, params: Seq[SamplingParams], prompts: Seq[Seq[int]],
          outputs: Seq[Seq[int]], stop_ids: frozenset[int]) -> torch.Tensor:
    """`logits` [K, V] with each row's penalties, bias and min_tokens applied (a new tensor
    when any row asks; the same one otherwise)."""
    rows = [i for i, sp in enumerate(params) if wanted(sp)]
    if not rows:
        return logits
    vocab, device = logits.shape[-1], logits.device
    idx = torch.tensor(rows, device=device)
    x = logits[idx].float()
    sps = [params[i] for i in rows]
    out_counts = _counts([outputs[i] for i in rows], vocab, device)
    rep = torch.tensor([sp.repetition_penalty for sp in sps], device=device).unsqueeze(1)
    if (rep != 1.0).any():
        seen = (_counts([prompts[i] for i in rows], vocab, device) + out_counts) > 0
        scaled = torch.where(x > 0, x / rep, x * rep)
        x = torch.where(seen, scaled, x)
    freq = torch.tensor([sp.frequency_penalty for sp in sps], device=device).unsqueeze(1)
    pres = torch.tensor([sp.presence_penalty for sp in sps], device=device).unsqueeze(1)
    x = x - freq * out_counts - pres * (out_counts > 0).float()
    for j, sp in enumerate(sps):
        if sp.logit_bias:
            tokens = torch.tensor([t for t, _ in sp.logit_bias], device=device)
            x[j, tokens] += torch.tensor([b for _, b in sp.logit_bias], device=device)
        if sp.min_tokens and len(outputs[rows[j]]) < sp.min_tokens:
            ends = [t for t in (*stop_ids, *sp.stop_token_ids) if t < vocab]
            if ends:
                x[j, ends] = float("-inf")
    full = logits.float().clone()
    full[idx] = x
    return full
