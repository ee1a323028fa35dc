"""Billing through the gateway: what a key is charged for a stream cut short, tokens
reserved then refunded, and every route's real token count (gateway/ratelimit.py)."""

from __future__ import annotations

import httpx

from .conftest import access_line


def test_a_stream_cut_by_its_client_is_charged_for_what_it_got(stack) -> None:
    pipe, _, secure = stack
    auth = {"authorization": "Bearer sk-metered", "x-request-id": "cut-1"}  # 600 tokens a
    # minute, 10 a second back
    body = {"model": "echo", "prompt": " ".join(["w"] * 100), "max_tokens": 100,
            "stream": True}
    with httpx.stream("POST", f"{secure}/v1/completions", json=body, headers=auth,
                      timeout=30) as res:
        assert res.status_code == 200
        lines = 0
        for line in res.iter_lines():
            lines += line.startswith("data: {")
            if lines >= 40:
                break  # the client leaves mid-stream
    logged = access_line(pipe, secure, "cut-1")  # written once the charge is settled
    assert logged["status"] == 499 and logged["cancelled"] and logged["cut_short"]
    assert 40 <= logged["completion_tokens"] < 100 and logged["prompt_tokens"] >= 40
    del auth["x-request-id"]
    probe = httpx.post(f"{secure}/v1/completions", headers=auth,
                       json={"model": "echo", "prompt": "a", "max_tokens": 1})
    assert probe.status_code == 200
    # charged: ~50 prompt + 40 streamed (not refunded in full, as before)
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) <= 560



def test_tokens_per_minute_are_reserved_then_refunded(stack) -> None:
    pipe, _, secure = stack
    auth = {"authorization": "Bearer sk-budget"}  # 600 tokens a minute
    body = {"model": "echo", "prompt": "two words", "max_tokens": 500}
    first = httpx.post(f"{secure}/v1/completions", json=body,
                       headers={**auth, "x-request-id": "budget-1"})
    assert first.status_code == 200 and first.json()["usage"]["completion_tokens"] == 2
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100  # 500 + prompt reserved
    access_line(pipe, secure, "budget-1")  # settled: what it did not use went back
    again = httpx.post(f"{secure}/v1/completions", json=body, headers=auth)
    assert again.status_code == 200, again.text  # fits only because the first was refunded
    never = httpx.post(f"{secure}/v1/completions", headers=auth,
                       json={**body, "max_tokens": 700})  # beyond the whole minute's budget
    assert never.status_code == 429 and never.headers["retry-after"] == "60"
    assert never.json()["error"]["code"] == "rate_limit_exceeded"



def test_every_route_is_charged_its_real_token_count(stack) -> None:
    """The chars / 4 estimate is trued up to the worker's count when a request ends, and
    /tokenize and /detokenize cost tokens like any request (600 tokens a minute here)."""
    pipe, _, secure = stack
    auth = {"authorization": "Bearer sk-counted"}
    big = httpx.post(f"{secure}/tokenize", headers=auth,
                     json={"model": "tiny", "prompt": "hello there " * 250})  # ~750 tokens
    assert big.status_code == 429 and big.headers["retry-after"] == "60"
    # 400 symbols: estimated at 101 tokens, counted as about one token each
    symbols = "".join(chr(33 + (i * 7) % 90) for i in range(400))
    under = httpx.post(f"{secure}/v1/completions", headers={**auth, "x-request-id": "under"},
                       json={"model": "tiny", "prompt": symbols, "max_tokens": 1})
    assert under.status_code == 200, under.text
    used = under.json()["usage"]["total_tokens"]
    assert used > 300
    access_line(pipe, secure, "under")  # settled
    tok = httpx.post(f"{secure}/tokenize", headers={**auth, "x-request-id": "tok"},
                     json={"model": "tiny", "prompt": "hello there " * 20})
    assert tok.status_code == 200, tok.text
    count = tok.json()["count"]
    access_line(pipe, secure, "tok")
    probe = httpx.post(f"{secure}/v1/completions", headers=auth,
                       json={"model": "echo", "prompt": "a", "max_tokens": 1})
    assert probe.status_code == 200
    # used + count charged, 2 reserved; 10 tokens a second come back meanwhile
    remaining = int(probe.headers["x-ratelimit-remaining-tokens"])
    assert remaining <= 600 - used - count - 2 + 30, (remaining, used, count)

