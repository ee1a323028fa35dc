"""The batched sampler: right distributions, cuts by top-k and top-p, draws keyed by seed."""

from __future__ import annotations

import math

import torch

from zeroserve.workers.llm import sampler
from zeroserve.workers.llm.params import SamplingParams

N = 6000


def frequencies(logits: torch.Tensor, sp: SamplingParams, n: int = N) -> torch.Tensor:
    """Draw n tokens from the same [V] logits with n different seeds, in one batch."""
    batch = logits.expand(n, -1).contiguous()
    tokens = sampler.sample(batch, [sp] * n, [(seed, 0) for seed in range(n)])
    return torch.bincount(tokens, minlength=logits.numel()).double() / n


def test_draws_follow_the_tempered_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    for temperature in (1.0, 0.5, 2.0):
        want = torch.softmax(logits.double() / temperature, dim=0)
        got = frequencies(logits, SamplingParams(temperature=temperature))
        # 6,000 draws: a standard error of at most 0.0065 per token
        assert (got - want).abs().max() < 0.025, (temperature, got, want)


def test_top_k_and_top_p_cut_and_renormalise() -> None:
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    got = frequencies(logits, SamplingParams(top_k=2))
    assert got[2:].sum() == 0
    assert abs(got[0] - 0.4 / 0.7) < 0.025
    got = frequencies(logits, SamplingParams(top_p=0.8))  # 0.4 + 0.3 < 0.8: three kept
    assert got[3:].sum() == 0
    assert abs(got[2] - 0.15 / 0.85) < 0.025
    got = frequencies(logits, SamplingParams(top_k=4, top_p=0.6))  # both cuts: two kept
    assert got[2:].sum() == 0


def test_a_draw_depends_on_its_key_alone() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    sps = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0),
           SamplingParams(top_k=20), SamplingParams(top_p=0.9), SamplingParams(top_k=1)]
    draws = [(11, 0), (12, 0), (13, 4), (14, 9), (15, 1)]
    together = sampler.sample(logits, sps, draws).tolist()
    alone = [sampler.sample(logits[i:i + 1], [sps[i]], [draws[i]]).item() for i in range(5)]
    assert together == alone  # the same token in any batch, beside any other settings
    assert together[1] == int(logits[1].argmax()) and together[4] == int(logits[4].argmax())
    again = sampler.sample(logits.flip(0), sps[::-1], draws[::-1]).tolist()
    assert again == together[::-1]
    other = [sampler.sample(logits[:1], [sps[0]], [(11, i)]).item() for i in range(1, 30)]
    assert len(set(other)) > 10  # the token index moves the key: not one token forever


def test_gumbel_noise_is_standard_and_pure() -> None:
    keys = torch.tensor([sampler.draw_seed(s, 0) for s in range(64)])
    ids = torch.arange(4096).expand(64, -1)
    g = sampler.gumbel(keys, ids).double()
    assert abs(g.mean() - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(g.var() - math.pi ** 2 / 6) < 0.05
    assert torch.equal(sampler.gumbel(keys[:3], ids[:3, 100:200]), g[:3, 100:200].float())
    assert sampler.draw_seed(2**63 - 1, 10**9) < 2**63
    assert sampler.draw_seed(7, 3) == sampler.draw_seed(7, 3) != sampler.draw_seed(7, 4)


def test_a_tiny_change_in_the_logits_rarely_changes_a_draw() -> None:
    """What makes a seed reproduce across batches: float noise of 1e-4 in the logits (another
    batch layout computes them in another order, bfloat16 more so) must almost never move a
    draw."""
    torch.manual_seed(1)
    logits = torch.randn(2000, 2048) * 3
    sps = [SamplingParams(temperature=1.0)] * 2000
    draws = [(seed, 5) for seed in range(2000)]
    a = sampler.sample(logits, sps, draws)
    b = sampler.sample(logits + torch.randn_like(logits) * 1e-4, sps, draws)
    assert (a != b).sum() <= 5  # inverse-CDF sampling moved 19 of these 2,000 (1 here)


def test_logprobs_read_back_with_the_tokens() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [1.0, 1.0, 5.0]])
    tokens = sampler.sample(logits, [SamplingParams(temperature=0.0)] * 3, [(0, 0)] * 3)
    asked = sampler.top_logprobs(logits, tokens, [2, None, 0])
    assert asked is not None
    entries = asked.entries([t.tolist() for t in asked.tensors()], tokens.tolist(), 3)
    lp = torch.log_softmax(logits, dim=-1)
    assert entries[1] is None
    assert entries[0]["token_id"] == 2 and math.isclose(entries[0]["logprob"], lp[0, 2],
                                                        rel_tol=1e-6)
    assert [a["token_id"] for a in entries[0]["top"]] == [2, 1]
    assert entries[2]["top"] == [] and entries[2]["token_id"] == 2
    assert sampler.top_logprobs(logits, tokens, [None] * 3) is None
