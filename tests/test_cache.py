"""gateway/cache.py: deterministic requests only, per tenant, LRU within a byte bound, TTL."""

from __future__ import annotations

import pytest

from zeroserve.gateway import cache as cache_mod
from zeroserve.gateway.cache import ResponseCache, cache_key


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(cache_mod.time, "monotonic", lambda: now[0])
    return now


def test_only_deterministic_requests_get_a_key_and_tenants_never_share_one() -> None:
    body = {"model": "m", "prompt": "p", "temperature": 0}
    assert cache_key("/v1/completions", body, "a") is not None
    assert cache_key("/v1/completions", {**body, "temperature": 0.7}, "a") is None
    assert cache_key("/v1/completions", {**body, "temperature": 0.7, "seed": 1}, "a")
    assert cache_key("/v1/completions", body, "a") != cache_key("/v1/completions", body, "b")
    assert cache_key("/v1/completions", body, "a") == cache_key(  # streaming is no difference
        "/v1/completions", {**body, "stream": True, "user": "u"}, "a")


def test_entries_expire_after_the_ttl(clock: list[float]) -> None:
    c = ResponseCache(max_bytes=1000, ttl_s=10)
    c.put("k", b"value")
    clock[0] += 9.9
    assert c.get("k") == b"value"
    clock[0] += 0.2
    assert c.get("k") is None and c.bytes == 0  # dropped, its bytes with it


def test_the_least_recently_used_goes_first_and_bytes_stay_bounded(clock: list[float]) -> None:
    c = ResponseCache(max_bytes=10, ttl_s=60)
    c.put("a", b"aaaa")
    c.put("b", b"bbbb")
    assert c.get("a") == b"aaaa"  # a is now the most recent
    c.put("c", b"cccc")  # 12 bytes > 10: the least recent (b) goes
    assert c.get("b") is None and c.get("a") == b"aaaa" and c.get("c") == b"cccc"
    assert c.bytes == 8
    c.put("huge", b"x" * 11)  # larger than the whole cache: never stored, nothing evicted
    assert c.get("huge") is None and c.bytes == 8
    c.put("a", b"a")  # replacing a value counts its new size only
    assert c.bytes == 5


def test_a_zero_size_or_ttl_turns_it_off() -> None:
    assert not ResponseCache(0, 60).enabled and not ResponseCache(10, 0).enabled
