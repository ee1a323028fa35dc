"""Service levels through a real gateway, broker and worker: a key's priority floor orders the
broker's queue, and deadlines (body `timeout`, `x-request-timeout`, a key's default) end a
queued request with 504 before any worker sees it."""

from __future__ import annotations

import json
import threading
import time

import httpx

from .conftest import start_gateway

KEYS = {"keys": [{"id": "chat", "key": "sk-chat"},
                 {"id": "batch", "key": "sk-batch", "priority": 10, "timeout": 0.5}]}


def _stack(pipeline, tmp_path) -> str:
    pipeline.start_broker()
    pipeline.start_worker("w", "--capacity", "1", "--step-delay-ms", "20")
    pipeline.wait_workers(1)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    return start_gateway(pipeline, "--api-keys-file", str(keys))


def _post(url: str, key: str, words: int = 3, **extra) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", **extra.pop("headers", {})}
    return httpx.post(f"{url}/v1/completions", headers=headers, timeout=30, json={
        "model": "echo", "prompt": " ".join(["w"] * words), "max_tokens": words, **extra})


def test_a_keys_priority_floor_orders_the_queue(pipeline, tmp_path) -> None:
    url = _stack(pipeline, tmp_path)
    done: list[str] = []

    def run(name: str, key: str, **extra) -> None:
        assert _post(url, key, **extra).status_code == 200
        done.append(name)

    hold = threading.Thread(target=run, args=("hold", "sk-chat"), kwargs={"words": 40})
    hold.start()
    time.sleep(0.3)  # it holds the only seat; the next two wait in the broker's queue
    # the batch key asks to outrank everyone, but its floor is 10 (and its timeout is 0.5 s:
    # this one names a longer one)
    late = [threading.Thread(target=run, args=("batch", "sk-batch"),
                             kwargs={"priority": -5, "timeout": 10.0}),
            threading.Thread(target=run, args=("chat", "sk-chat"), kwargs={"priority": 0})]
    for t in late:
        t.start()
        time.sleep(0.1)
    for t in (hold, *late):
        t.join(30)
    assert done == ["hold", "chat", "batch"]


def test_deadlines_from_body_header_and_key_end_a_queued_request_with_504(pipeline,
                                                                         tmp_path) -> None:
    url = _stack(pipeline, tmp_path)
    hold = threading.Thread(target=_post, args=(url, "sk-chat", 100))  # ~2 s in the seat
    hold.start()
    time.sleep(0.3)
    for key, extra, bound in (("sk-chat", {"timeout": 0.2}, 0.2),
                              ("sk-chat", {"headers": {"x-request-timeout": "0.2"}}, 0.2),
                              ("sk-batch", {}, 0.5)):  # the key's default
        t0 = time.monotonic()
        r = _post(url, key, **extra)
        took = time.monotonic() - t0
        assert r.status_code == 504 and "deadline" in r.json()["error"]["message"], r.text
        assert bound <= took < bound + 0.5, took
    bad = _post(url, "sk-chat", headers={"x-request-timeout": "soon"})
    assert bad.status_code == 400 and "x-request-timeout" in bad.text
    hold.join(30)
