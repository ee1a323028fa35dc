"""The gateway's middleware (gateway/middleware.py) around an ASGI app that fails: the client
gets a generic 500 in OpenAI's shape with the request id, the log gets the detail."""

from __future__ import annotations

import logging

import httpx
import pytest

from zeroserve.gateway.middleware import Frontline


async def _failing_app(scope: dict, receive, send) -> None:
    raise KeyError("secret internal detail")


async def test_an_unexpected_error_is_a_generic_500_and_a_logged_detail(caplog) -> None:
    app = Frontline(_failing_app, max_body_bytes=1024)
    transport = httpx.ASGITransport(app=app)
    with caplog.at_level(logging.ERROR, "zeroserve.gateway"):
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            resp = await client.post("/v1/completions", json={"model": "m"},
                                     headers={"x-request-id": "req-42"})
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "internal_error" and "req-42" in error["message"]
    assert "secret" not in resp.text
    failed = [r for r in caplog.records if "req-42" in r.getMessage()]
    assert failed and failed[0].exc_info[0] is KeyError


async def test_a_body_that_never_completes_gets_no_answer() -> None:
    sent: list[dict] = []
    messages = iter([{"type": "http.request", "body": b"{", "more_body": True},
                     {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    async def app(scope, receive, send) -> None:  # pragma: no cover - must not be reached
        pytest.fail("the app ran on half a body")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"content-length", b"100")]}
    await Frontline(app, max_body_bytes=1024)(scope, receive, send)
    assert sent == []


async def _run(app, caplog, raises: type | None = None) -> tuple[list[dict], dict]:
    """One GET through Frontline; what it sent, and its access log line."""
    import contextlib
    import json

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    with (caplog.at_level(logging.INFO, "zeroserve.access"),
          pytest.raises(raises) if raises else contextlib.nullcontext()):
        await Frontline(app, max_body_bytes=1024)(scope, receive, send)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "zeroserve.access"]
    assert len(lines) == 1
    return sent, lines[0]


async def _start(send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})


async def _breaks_mid_body(scope, receive, send) -> None:
    await _start(send)
    raise RuntimeError("broke after the headers")


async def _client_leaves(scope, receive, send) -> None:
    await _start(send)  # then the stream is cancelled: its last body message never goes


async def test_a_response_that_fails_after_its_headers_is_logged_as_500(caplog) -> None:
    sent, line = await _run(_breaks_mid_body, caplog, RuntimeError)
    assert sent[0]["status"] == 200 and line["status"] == 500 and "cancelled" not in line


async def test_a_response_its_client_left_is_logged_as_cancelled(caplog) -> None:
    sent, line = await _run(_client_leaves, caplog)
    assert sent[0]["status"] == 200 and line["status"] == 499 and line["cancelled"] is True
