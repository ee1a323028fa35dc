"""The request contract (zeroserve/contract.py) is the one source of defaults and bounds: the
SDK's check, the gateway's schema and the engine's parse accept and refuse the same values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from zeroserve import contract, errors
from zeroserve.client_core import choice_params, request_body
from zeroserve.gateway.schemas import ChatCompletionRequest, CompletionRequest
from zeroserve.workers.engine import EngineError
from zeroserve.workers.llm import params as engine_params

VOCAB = 1 << 21  # past every bound: the engine's vocabulary cap does not enter


def outside(b: contract.Bounds) -> list:
    step = 1 if b.integer else 1e-3
    return [b.lo - step, b.hi + step]


def gateway_ok(name: str, value) -> bool:
    try:
        CompletionRequest(model="m", prompt="p", **{"max_tokens": 1 << 20, name: value})
        return True
    except ValidationError:
        return False


def engine_ok(name: str, value) -> bool:
    try:
        engine_params.parse({"max_tokens": 1 << 20, name: value}, VOCAB)
        return True
    except EngineError:
        return False


def sdk_ok(name: str, value) -> bool:
    try:  # as generate() and chat() do: n becomes n requests, each checked
        for each in choice_params({name: value}):
            request_body("p", each)
        return True
    except errors.BadRequestError:
        return False


@pytest.mark.parametrize("name", sorted(contract.NUMBERS))
def test_the_three_sides_agree_on_each_bound(name) -> None:
    b = contract.NUMBERS[name]
    sides = [sdk_ok, gateway_ok] + ([engine_ok] if name not in contract.ENGINE_FREE else [])
    for value in (b.lo, b.hi):
        assert all(ok(name, value) for ok in sides), (name, value)
    for value in outside(b):
        assert not any(ok(name, value) for ok in sides), (name, value)


def test_defaults_are_the_contracts() -> None:
    sp = engine_params.parse({}, VOCAB)
    req = CompletionRequest(model="m", prompt="p")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens"):
        assert getattr(sp, name) == getattr(req, name) == contract.default(name), name
    assert sp.max_tokens == req.engine_body()["max_tokens"] == contract.default("max_tokens")
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert chat.engine_body()["max_tokens"] == contract.CHAT_MAX_TOKENS


def test_the_sdk_refuses_bad_stop_and_bias_before_sending() -> None:
    for bad in ({"stop": [""]}, {"stop": ["x"] * (contract.MAX_STOP + 1)},
                {"logit_bias": {"5": 101}}, {"logit_bias": {"5": True}}, {"temperature": "1"}):
        with pytest.raises(errors.BadRequestError):
            request_body("p", bad)
    assert request_body("p", {"stop": "x", "logit_bias": {"5": -100}})["prompt"] == "p"


def test_the_gateway_and_the_sdk_build_only_the_contracts_body() -> None:
    """Every key the gateway's mapping or the SDK sends an LLM worker is a field of
    contract.GenerationBody, which the engine reads (and refuses any other key of)."""
    numbers = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 1,
               "presence_penalty": 0.1, "frequency_penalty": 0.1, "repetition_penalty": 1.1,
               "min_tokens": 1, "stop": ["x"], "logit_bias": {"5": 1.0}, "priority": 1}
    completion = CompletionRequest(model="m", prompt="p", logprobs=2, **numbers).engine_body()
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                 logprobs=True, top_logprobs=2, **numbers).engine_body()
    for body in (completion, chat):
        assert set(numbers) <= set(body) <= contract.LLM_FIELDS, set(body) - contract.LLM_FIELDS
    sdk = request_body("p", {**numbers, "ignore_eos": True, "cache_salt": "s"})
    assert set(sdk) <= contract.LLM_FIELDS
    assert set(contract.NUMBERS) - set(contract.ENGINE_FREE) <= contract.LLM_FIELDS
    sp = engine_params.parse({k: v for k, v in sdk.items() if k != "prompt"}, VOCAB)
    assert (sp.max_tokens, sp.top_k, sp.stop) == (5, 3, ("x",))
