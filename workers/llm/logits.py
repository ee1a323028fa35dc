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
from zeroserve.workers.llm.transfer import to_device


def wanted(sp: SamplingParams) -> bool:
    return bool(sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0
                or sp.logit_bias or sp.min_tokens)


def _counts(rows: Seq[Seq[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, vocab] how many times each token appears in each row's id list."""
    width = max((len(r) for r in rows), default=0) + 1  # pad with a spare column, `vocab`
    ids = to_device([[*r, *[vocab] * (width - len(r))] for r in rows], torch.long, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply(logits: torch.Tensor, params: Seq[SamplingParams],
          histories: Seq[tuple[list[int], int]], stop_ids: frozenset[int]) -> torch.Tensor:
    """`logits` [K, V] with each row's penalties, bias and min_tokens applied (a new tensor
    when any row asks; the same one otherwise). A row's history is (its token ids, prompt
    then output, and its prompt's length): split only for the rows that ask."""
    rows = [i for i, sp in enumerate(params) if wanted(sp)]
    if not rows:
        return logits
    prompts = {i: histories[i][0][:histories[i][1]] for i in rows}
    outputs = {i: histories[i][0][histories[i][1]:] for i in rows}
    vocab, device = logits.shape[-1], logits.device
    idx = to_device(rows, torch.long, device)
    x = logits[idx].float()
    sps = [params[i] for i in rows]
    out_counts = _counts([outputs[i] for i in rows], vocab, device)
    # one transfer for every row's numbers: repetition, frequency, presence
    nums = to_device([[sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty]
                      for sp in sps], torch.float32, device)
    if any(sp.repetition_penalty != 1.0 for sp in sps):
        rep = nums[:, 0:1]
        seen = (_counts([prompts[i] for i in rows], vocab, device) + out_counts) > 0
        scaled = torch.where(x > 0, x / rep, x * rep)
        x = torch.where(seen, scaled, x)
    x = x - nums[:, 1:2] * out_counts - nums[:, 2:3] * (out_counts > 0).float()
    bias = [(j, t, b) for j, sp in enumerate(sps) for t, b in sp.logit_bias]
    ends = [t for t in stop_ids if t < vocab]
    for j, sp in enumerate(sps):  # min_tokens: ends are -inf (a bias of -inf) until then
        if sp.min_tokens and len(outputs[rows[j]]) < sp.min_tokens:
            bias += [(j, t, float("-inf")) for t in (*ends, *sp.stop_token_ids) if t < vocab]
    if bias:
        at = to_device([[j, t] for j, t, _ in bias], torch.long, device)
        x.index_put_((at[:, 0], at[:, 1]), to_device([b for _, _, b in bias], torch.float32,
                                                     device), accumulate=True)
    full = logits.float().clone()
    full[idx] = x
    return full
