"""Tool calling end to end with the official openai client against a real gateway, broker and
LLM worker on the tiny random model: a required or named choice always yields a call whose
arguments parse against its function's schema, whole and streamed; conversations with calls
and tool results render; auto returns text from a model that makes no call."""

from __future__ import annotations

import json

import jsonschema
import pytest

from .test_structured import client  # noqa: F401 (the pipeline fixture)

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8},
    "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "a + b",
                                           "parameters": ADD}}]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "weather in Paris, or add two numbers"}]


def check_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMA_OF[call.function.name])
    return args


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_choice_always_calls_a_tool_with_valid_arguments(client, seed) -> None:  # noqa: F811
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                         tool_choice="required", max_tokens=200, seed=seed)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])


def test_named_choice_streams_deltas_that_reassemble_to_the_same_call(client) -> None:  # noqa: F811
    named = {"type": "function", "function": {"name": "add"}}
    whole = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                           tool_choice=named, max_tokens=200, seed=5)
    call = whole.choices[0].message.tool_calls[0]
    assert call.function.name == "add"
    args = check_call(call)
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                            tool_choice=named, max_tokens=200, seed=5,
                                            stream=True)
    name, pieces, ids, finish = None, [], set(), None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or ():
            assert tc.index == 0
            ids.add(tc.id) if tc.id else None
            name = tc.function.name or name
            pieces.append(tc.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    assert name == "add" and finish == "tool_calls" and len(ids) == 1
    # the arguments come as they are generated (in one piece when the reader lags behind the
    # tiny model: its deltas merge on the way, replies.py), and reassemble to the same call
    assert [p for p in pieces if p] and json.loads("".join(pieces)) == args


def test_a_conversation_with_calls_and_results_renders(client) -> None:  # noqa: F811
    base = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    out = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS,
                                         max_tokens=4, temperature=0)
    # the tools, the call and its result went through the chat template into the prompt
    shown = len(json.dumps(TOOLS)) // 4
    assert out.usage.prompt_tokens > base.usage.prompt_tokens + shown // 2
    without = client.chat.completions.create(model="tiny", messages=history[:-1], tools=TOOLS,
                                             max_tokens=1)
    assert out.usage.prompt_tokens > without.usage.prompt_tokens  # the tool's result too


def test_auto_returns_text_when_the_model_makes_no_call(client) -> None:  # noqa: F811
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                         max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("length", "stop")
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                          tool_choice="none", max_tokens=1)
    assert none.usage.prompt_tokens < out.usage.prompt_tokens  # "none": tools not shown
