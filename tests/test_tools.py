"""gateway/tools.py: the forced schema, parsing a reply, and turning a stream into deltas."""

from __future__ import annotations

import json

import jsonschema

from zeroserve.gateway.tools import ToolStream, forced_schema, parse

F = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}
G = {"name": "g"}


def test_the_forced_schema_admits_one_call_of_a_listed_function() -> None:
    schema = forced_schema([F, G])
    jsonschema.validate({"name": "f", "arguments": {"x": 1}}, schema)
    jsonschema.validate({"name": "g", "arguments": {}}, schema)
    for bad in ({"name": "h", "arguments": {}}, {"name": "f", "arguments": {"x": "1"}},
                {"name": "f"}, {"name": "f", "arguments": {}, "extra": 1}):
        try:
            jsonschema.validate(bad, schema)
        except jsonschema.ValidationError:
            continue
        raise AssertionError(f"admitted {bad}")
    assert forced_schema([F])["properties"]["name"] == {"const": "f"}


def test_parse_finds_hermes_blocks_and_keeps_the_rest_as_content() -> None:
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"x": 2}}</tool_call>' \
           '<tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = parse(text, False, "r")
    assert content == "Sure."
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in calls] == [("call_r_0", "f", {"x": 2}), ("call_r_1", "g", {})]
    assert parse("no calls <tool_call>{broken</tool_call>", False, "r") == (
        "no calls <tool_call>{broken</tool_call>", [])
    assert parse('{"name":"f","arguments":{"x":1}}', True, "r")[1][0]["function"] == {
        "name": "f", "arguments": '{"x":1}'}
    assert parse('{"name":"f","argu', True, "r") == ('{"name":"f","argu', [])  # cut short


def feed_all(stream: ToolStream, pieces: list[str], reason: str) -> tuple[list, str | None]:
    deltas = [d for p in pieces for d in stream.feed(p)]
    rest, fin = stream.finish(reason)
    return deltas + rest, fin


def test_a_forced_stream_sends_the_name_then_the_arguments_in_pieces() -> None:
    text = '{"name":"f","arguments":{"x":12,"y":[1,2]}}'
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    deltas, fin = feed_all(ToolStream(True, "r"), pieces, "stop")
    assert fin == "tool_calls"
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert json.loads(args) == {"x": 12, "y": [1, 2]} and len(deltas) > 3
    cut, fin = feed_all(ToolStream(True, "r"), ['{"name":"f","arguments":{"x":1'], "length")
    assert fin == "length" and "".join(
        d["tool_calls"][0]["function"]["arguments"] for d in cut[1:]) == '{"x":1'


def test_an_auto_stream_holds_back_a_call_and_passes_text_through() -> None:
    stream = ToolStream(False, "r")
    assert stream.feed("Hello <tool") == [{"content": "Hello "}]  # "<tool" may open a call
    assert stream.feed('_call>{"name": "g", "arguments": {}}</tool_call>') == []
    rest, fin = stream.finish("stop")
    assert fin == "tool_calls" and rest[-1]["tool_calls"][0]["function"]["name"] == "g"
    plain, fin = feed_all(ToolStream(False, "r"), ["a <b", "> c"], "length")
    assert "".join(d["content"] for d in plain) == "a <b> c" and fin == "length"
