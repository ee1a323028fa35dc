"""Penalties, logit_bias and min_tokens (workers/llm/logits.py) against their formulas on fixed
logits, and in the engine: a bias of +100 forces its token; min_tokens holds off the end."""

from __future__ import annotations

import pytest
import torch

from zeroserve.workers.llm import logits as lp
from zeroserve.workers.llm.params import SamplingParams, parse

from .test_llm import engine, run_all  # noqa: F401 (the engine fixture)

V = 12


def _reference(row: list[float], sp: SamplingParams, prompt: list[int], out: list[int],
               ends: set[int]) -> list[float]:
    """The definitions, one token at a time."""
    x = list(row)
    for t in range(V):
        if sp.repetition_penalty != 1.0 and (t in prompt or t in out):
            x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
        x[t] -= sp.frequency_penalty * out.count(t) + sp.presence_penalty * (t in out)
    for t, b in sp.logit_bias:
        x[t] += b
    if len(out) < sp.min_tokens:
        for t in ends | set(sp.stop_token_ids):
            x[t] = float("-inf")
    return x


def test_processing_matches_the_formulas_row_by_row() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=gen) * 3
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # asks for nothing: untouched
        SamplingParams(logit_bias=((3, 100.0), (5, -100.0)), min_tokens=4,
                       stop_token_ids=(7,)),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0),
    ]
    prompts = [[1, 2, 2], [4], [9], [0, 11]]
    outputs = [[2, 3, 3, 3], [5], [1, 2], []]
    histories = [(p + o, len(p)) for p, o in zip(prompts, outputs, strict=True)]
    got = lp.apply(logits, params, histories, frozenset({0}))
    for i, sp in enumerate(params):
        want = _reference(logits[i].tolist(), sp, prompts[i], outputs[i], {0})
        assert got[i].tolist() == pytest.approx(want, rel=1e-6)
    assert lp.apply(logits, [SamplingParams()] * 4, histories, frozenset()) is logits


def test_logit_bias_is_checked() -> None:
    assert parse({"logit_bias": {"5": 3}}, V).logit_bias == ((5, 3.0),)
    for bad in ({"x": 1}, {"99": 1}, {"5": 101}, {"5": True}, ["5"]):
        with pytest.raises(Exception, match="logit_bias"):
            parse({"logit_bias": bad}, V)


def test_a_bias_of_100_forces_its_token_and_min_tokens_holds_off_the_end(engine) -> None:  # noqa: F811
    forced = 123
    res = run_all(engine, {0: [
        ("greedy", {"prompt": "hello", "max_tokens": 6, "temperature": 0,
                    "logit_bias": {str(forced): 100}}),
        ("sampled", {"prompt": "hello", "max_tokens": 6, "temperature": 1.0, "seed": 3,
                     "logit_bias": {str(forced): 100}}),
        ("free", {"prompt": "hello", "max_tokens": 6, "temperature": 0}),
    ]})
    assert res["greedy"]["ids"] == [forced] * 6 and res["sampled"]["ids"] == [forced] * 6
    assert res["free"]["ids"] != [forced] * 6  # its neighbour in the batch was not biased
    eos = min(engine.eos_ids)
    res = run_all(engine, {0: [
        ("ends", {"prompt": "x", "max_tokens": 8, "temperature": 0,
                  "logit_bias": {str(eos): 100}}),
        ("held", {"prompt": "x", "max_tokens": 8, "temperature": 0, "min_tokens": 5,
                  "logit_bias": {str(eos): 100}}),
    ]})
    assert len(res["ends"]["ids"]) == 1 and res["ends"]["finish"]["finish_reason"] == "stop"
    assert len(res["held"]["ids"]) == 6 and res["held"]["ids"][-1] == eos
