"""Structured outputs (workers/llm/grammar.py) end to end: the official openai client's
`chat.completions.parse` against a real gateway, broker and LLM worker on the tiny random
model. The model is random, so only the grammar makes its output valid; every schema here is
bounded (string lengths, integer ranges, array sizes) so that a valid value always ends."""

from __future__ import annotations

import enum
import json
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from .conftest import Pipeline, start_gateway

Short = Annotated[str, Field(max_length=6)]
Small = Annotated[int, Field(ge=0, le=99)]


class Color(enum.StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Point(BaseModel):
    x: Small
    y: Small


class Person(BaseModel):
    name: Short
    age: Small


class Tagged(BaseModel):
    tags: list[Short] = Field(max_length=3)


class Nested(BaseModel):
    owner: Person
    where: Point


class WithEnum(BaseModel):
    color: Color
    shade: Literal["light", "dark"]


class Optional_(BaseModel):
    note: Short | None
    count: Small | None


class Flags(BaseModel):
    on: bool
    off: bool
    level: Annotated[int, Field(ge=-5, le=5)]


class Points(BaseModel):
    points: list[Point] = Field(max_length=3)


class Deep(BaseModel):
    a: Nested
    b: WithEnum


class Words(BaseModel):
    first: Short
    second: Short
    third: Short


SCHEMAS: list[type[BaseModel]] = [
    Point, Person, Tagged, Nested, WithEnum, Optional_, Flags, Points, Deep, Words,
]
# ten more: each with a differently bounded field beside a nested one
SCHEMAS += [
    type(f"Record{i}", (BaseModel,), {
        "__annotations__": {"id": Annotated[int, Field(ge=i, le=i + 9)],
                            "label": Annotated[str, Field(max_length=1 + i % 5)],
                            "kind": Literal["a", "b", "c"], "at": Point}})
    for i in range(10)
]


@pytest.fixture(scope="module")
def client(tiny_model):
    pipe = Pipeline(Path(tempfile.mkdtemp(prefix="zs-structured-")))
    try:
        pipe.start_broker()
        pipe.start_worker("llm", "--model", str(tiny_model), "--served-name", "tiny",
                          "--max-num-seqs", "16", "--max-model-len", "1024", engine="llm")
        pipe.wait_workers(1)
        url = start_gateway(pipe)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    finally:
        pipe.close()


def _ask(client: openai.OpenAI, schema: type[BaseModel], seed: int) -> BaseModel:
    completion = client.chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": f"a {schema.__name__}, please"}],
        response_format=schema, max_tokens=400, temperature=1.0, seed=seed)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), schema.model_json_schema())
    assert isinstance(choice.message.parsed, schema)
    return choice.message.parsed


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_parse_returns_a_valid_object_for_each_schema(client, schema) -> None:
    _ask(client, schema, seed=7)


def test_seeded_structured_output_repeats_and_free_text_shares_the_batch(client) -> None:
    results: dict[str, object] = {}

    def free_text() -> None:
        results["free"] = client.completions.create(model="tiny", prompt="free text beside",
                                                    max_tokens=40, temperature=0)

    side = threading.Thread(target=free_text)
    side.start()
    first = _ask(client, Nested, seed=11)
    side.join()
    assert _ask(client, Nested, seed=11) == first
    assert results["free"].choices[0].text  # the unconstrained request was not affected


def test_a_streamed_structured_output_reassembles_to_valid_json(client) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream it"}], stream=True,
        max_tokens=400, seed=3, response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": Person.model_json_schema(), "strict": True}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    Person.model_validate_json(text)


def test_json_object_mode_and_bad_schemas(client) -> None:
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "any object"}], max_tokens=60,
        seed=5, response_format={"type": "json_object"})
    choice = out.choices[0]
    if choice.finish_reason == "stop":  # a random model may still be inside a string
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "object", "properties": {
                    "a": {"$ref": "#/definitions/missing"}}}}})
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema"})


def test_logit_bias_and_penalties_through_the_openai_client(client) -> None:
    biased = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "anything"}], max_tokens=4,
        temperature=1.0, logit_bias={"123": 100}, logprobs=True)
    tokens = [t.token for t in biased.choices[0].logprobs.content]
    one = client.completions.create(model="tiny", prompt="other", max_tokens=1,
                                    logit_bias={"123": 100}).choices[0].text
    assert tokens == [tokens[0]] * 4 and biased.choices[0].message.content == one * 4
    plain = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "anything"}], max_tokens=12,
        temperature=0)
    penalised = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "anything"}], max_tokens=12,
        temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.choices[0].message.content != penalised.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model="tiny", max_tokens=2, logit_bias={"x": 1},
                                       messages=[{"role": "user", "content": "x"}])


def test_tokenize_detokenize_round_trip_and_context_overflow(client) -> None:
    import httpx

    url = str(client.base_url).removesuffix("/v1/")
    text = "hello from zeroserve, tokenized"
    tok = httpx.post(f"{url}/tokenize", json={"model": "tiny", "prompt": text}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 1024
    back = httpx.post(f"{url}/detokenize", json={"model": "tiny", "tokens": tok["tokens"]})
    assert back.json() == {"prompt": text}
    chat = httpx.post(f"{url}/tokenize", json={
        "model": "tiny", "messages": [{"role": "user", "content": text}]}).json()
    assert chat["count"] > tok["count"]  # the template adds its markers
    bad = httpx.post(f"{url}/detokenize", json={"model": "tiny", "tokens": [10**12]})
    assert bad.status_code == 400
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=text, max_tokens=1020)
    message = str(info.value)
    assert f"({tok['count']} tokens)" in message and "1020" in message and "1024" in message


def test_n_choices_share_a_prompt_and_a_seed_reproduces_them(client) -> None:
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "three ways"}],
           "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 21}
    first = client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert [c.message.content for c in client.chat.completions.create(**ask).choices] == texts
    assert 3 <= first.usage.completion_tokens <= 24  # three choices of at most 8 tokens
    streamed = ["", "", ""]
    usage = None
    for chunk in client.chat.completions.create(**ask, stream=True,
                                                stream_options={"include_usage": True}):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
        usage = chunk.usage or usage
    assert streamed == texts
    assert usage.completion_tokens == first.usage.completion_tokens
    assert usage.prompt_tokens == first.usage.prompt_tokens
