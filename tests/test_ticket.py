"""gateway/ticket.py: a request's reservation is settled once, charged for what it used."""

from __future__ import annotations

from zeroserve.gateway.ratelimit import Limits, RateLimiter
from zeroserve.gateway.ticket import Ticket


def level(limiter: RateLimiter, key_id: str) -> float:
    return limiter.tokens[key_id].level


def test_settle_gives_back_what_was_not_used_once() -> None:
    limiter, t = RateLimiter(), Ticket("r1", model="m")
    assert limiter.admit("k", Limits(rps=0, tpm=600), 500)[0] == 0
    t.reserve(limiter, "k", 500)
    t.prompt_tokens, t.completion_tokens = 3, 7
    t.settle()
    t.settle()  # the middleware settles again after the app: nothing more comes back
    assert round(level(limiter, "k")) == 600 - 10
    assert t.log_fields() == {"key_id": "k", "model": "m", "prompt_tokens": 3,
                              "completion_tokens": 7}


def test_a_stream_without_its_end_is_charged_its_estimate_and_what_it_streamed() -> None:
    limiter, t = RateLimiter(), Ticket("r2")
    limiter.admit("k", Limits(rps=0, tpm=600), 400)
    t.reserve(limiter, "k", 400)
    t.prompt_estimate, t.streamed_tokens, t.cancelled = 50, 40, True
    assert t.used() == 90
    t.settle()
    assert round(level(limiter, "k")) == 600 - 90
    fields = t.log_fields()
    assert fields["cut_short"] and fields["cancelled"] and fields["completion_tokens"] == 40


def test_a_request_that_never_ran_is_refunded_in_full() -> None:
    limiter, t = RateLimiter(), Ticket("r3")
    limiter.admit("k", Limits(rps=0, tpm=600), 300)
    t.reserve(limiter, "k", 300)
    t.settle()
    assert round(level(limiter, "k")) == 600


def test_a_request_that_used_more_than_it_reserved_is_charged_the_rest() -> None:
    limiter, t = RateLimiter(), Ticket("r4")
    limiter.admit("k", Limits(rps=0, tpm=600), 550)
    t.reserve(limiter, "k", 550)  # an estimate of 50 prompt tokens + 500 max_tokens
    t.prompt_tokens, t.completion_tokens = 500, 400  # the prompt counted 10x the estimate
    t.settle()
    assert round(level(limiter, "k")) == 600 - 900  # in debt: the key waits it off
    wait, _ = limiter.admit("k", Limits(rps=0, tpm=600), 10)
    assert wait > 30
