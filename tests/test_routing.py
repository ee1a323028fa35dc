"""Prefix-affinity routing end to end: three tiny-model workers behind one broker, driven through
the gateway as a chat client would (broker/affinity.py, broker/table.py, zeroserve/prefix.py)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal

import httpx

from zeroserve.tooling.bench.fleet import conversations

from .conftest import Pipeline, start_gateway, wait_for


def _fleet(pipeline: Pipeline, tiny_model, *broker_args: str, seqs: int = 8) -> str:
    pipeline.start_broker(*broker_args)
    pipeline.wait_broker()
    for i in range(3):
        pipeline.start_worker(f"w{i}", "--model", str(tiny_model), "--served-name", "tiny",
                              "--max-model-len", "1024", "--dtype", "float32",
                              "--max-num-seqs", str(seqs), engine="llm")
    pipeline.wait_workers(3, timeout_s=120)
    return start_gateway(pipeline, "--cache-mb", "0")


def _turn(url: str, messages: list[dict], max_tokens: int = 16, **extra: object) -> dict:
    res = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
        **extra})
    assert res.status_code == 200, res.text
    return res.json()


def _cached(reply: dict) -> int:
    return (reply["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)


def _stats(pipeline: Pipeline) -> dict:
    with pipeline.client() as c:
        return c.admin("stats")


def _conversation(url: str, questions: list[str]) -> list[dict]:
    messages: list[dict] = []
    replies = []
    for q in questions:
        messages.append({"role": "user", "content": q})
        replies.append(_turn(url, messages))
        messages.append({"role": "assistant",
                         "content": replies[-1]["choices"][0]["message"]["content"]})
    return replies


def test_a_conversations_turns_land_on_the_worker_that_has_it_cached(pipeline,
                                                                      tiny_model) -> None:
    url = _fleet(pipeline, tiny_model)
    for questions in conversations(3, 4):
        replies = _conversation(url, questions)
        for before, after in zip(replies, replies[1:], strict=False):
            # all of the last turn's prompt (bar its unfilled last block) is in the cache
            assert _cached(after) >= before["usage"]["prompt_tokens"] - 16, replies
    routed = _stats(pipeline)["routed"]
    assert routed["affinity"] >= 9 and routed["cold"] == 3, routed


def test_least_loaded_routing_scatters_the_same_conversation(pipeline, tiny_model) -> None:
    url = _fleet(pipeline, tiny_model, "--routing", "least-loaded")
    replies = _conversation(url, conversations(1, 4)[0])
    # idle workers tie and rotate: turns land elsewhere and find little of their history
    assert min(_cached(r) for r in replies[1:]) < replies[0]["usage"]["prompt_tokens"] - 16
    assert _stats(pipeline)["routed"] == {"affinity": 0, "spilled": 0, "cold": 0}


def test_a_hot_prefix_spills_to_the_other_workers_once_its_worker_is_loaded(
        pipeline, tiny_model) -> None:
    url = _fleet(pipeline, tiny_model, seqs=2)  # capacity 4: spills 2 ahead of the others
    system = {"role": "system", "content": conversations(1, 1)[0][0]}
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda i: _turn(url, [system, {"role": "user", "content": f"q{i}"}],
                                      max_tokens=48), range(12)))
    routed = _stats(pipeline)["routed"]
    assert routed["spilled"] >= 1 and routed["affinity"] >= 1, routed
    with pipeline.client() as c:
        served = {w["worker_id"]: w["served"] for w in c.workers()}
    assert sum(n > 0 for n in served.values()) >= 2, served


def test_killing_a_conversations_worker_resumes_it_elsewhere(pipeline, tiny_model) -> None:
    url = _fleet(pipeline, tiny_model)
    questions = conversations(1, 2)[0]
    messages = [{"role": "user", "content": questions[0]}]
    first = _turn(url, messages)
    messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": questions[1]}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, victim = "", None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as res:
        for line in res.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                text += choice["delta"].get("content") or ""
            if victim is None and len(text) > 40:  # the worker holding this conversation
                with pipeline.client() as c:
                    busy = wait_for(lambda c=c: [w for w in c.workers() if w["in_flight"]])
                assert busy, pipeline.dump_logs()
                victim = busy[0]["worker_id"]
                os.kill(pipeline.workers[victim].pid, signal.SIGKILL)
    assert victim is not None
    calm = _turn(url, messages, max_tokens=300, ignore_eos=True)  # greedy: undisturbed
    assert text == calm["choices"][0]["message"]["content"]
    assert calm["usage"]["completion_tokens"] == 300
