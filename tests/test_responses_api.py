"""/v1/responses with the official openai client: whole and streamed, structured text, a
conversation as input, max_output_tokens, and what it refuses (stored state, tools)."""

from __future__ import annotations

import json

import openai
import pytest

from .test_structured import client  # noqa: F401 (the pipeline fixture)


def test_create_returns_a_response_with_its_text_and_usage(client) -> None:  # noqa: F811
    r = client.responses.create(model="tiny", input="Say something", max_output_tokens=8,
                                temperature=0, instructions="Be brief.")
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.output_text and r.output_text == r.output[0].content[0].text
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + 8 and r.store is False
    chat = client.chat.completions.create(
        model="tiny", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Say something"}])
    assert r.output_text == chat.choices[0].message.content  # served as that chat


def test_a_streamed_response_sends_the_typed_events_in_order(client) -> None:  # noqa: F811
    events = list(client.responses.create(model="tiny", input="Stream it", stream=True,
                                          max_output_tokens=6, temperature=0))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == events[-4].text and final.usage.output_tokens == 6
    whole = client.responses.create(model="tiny", input="Stream it", max_output_tokens=6,
                                    temperature=0)
    assert whole.output_text == deltas


def test_structured_text_and_a_conversation_as_input(client) -> None:  # noqa: F811
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    r = client.responses.create(
        model="tiny", max_output_tokens=50,
        input=[{"role": "user", "content": "a number"},
               {"role": "assistant", "content": [{"type": "output_text", "text": "which?"}]},
               {"role": "user", "content": [{"type": "input_text", "text": "any"}]}],
        text={"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": True}})
    assert r.status == "completed" and 0 <= json.loads(r.output_text)["n"] <= 9


def test_it_refuses_server_state_and_tools(client) -> None:  # noqa: F811
    with pytest.raises(openai.BadRequestError, match="keeps no responses"):
        client.responses.create(model="tiny", input="x", previous_response_id="resp_1")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="tiny", input="x", tools=[{
            "type": "function", "name": "f", "parameters": {"type": "object"}}])
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="x", stream=True)
