"""CORS at the gateway: off by default; with --cors-origins, preflights and answers (a 401
included) carry the allowed origin, and other origins get no grant."""

from __future__ import annotations

import httpx

from .conftest import start_gateway


def test_cors_is_off_by_default_and_grants_only_the_configured_origins(pipeline,
                                                                       tmp_path) -> None:
    pipeline.start_broker("--heartbeat-interval-s", "1")
    pipeline.start_worker("echo", "--model", "echo", "--heartbeat-interval-s", "1")
    pipeline.wait_workers(1)
    plain = start_gateway(pipeline)
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"id": "web", "key": "sk-web"}]}')
    cors = start_gateway(pipeline, "--cors-origins", "https://app.example, https://b.example",
                         "--api-keys-file", str(keys))
    ask = {"origin": "https://app.example", "access-control-request-method": "POST",
           "access-control-request-headers": "authorization, content-type"}
    pre = httpx.options(f"{cors}/v1/completions", headers=ask)
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    body = {"model": "echo", "prompt": "hi there", "max_tokens": 2}
    ok = httpx.post(f"{cors}/v1/completions", json=body, headers={
        "origin": "https://b.example", "authorization": "Bearer sk-web"})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://b.example"
    assert "x-request-id" in ok.headers["access-control-expose-headers"]
    denied = httpx.post(f"{cors}/v1/completions", json=body,
                        headers={"origin": "https://app.example"})
    assert denied.status_code == 401  # no key: refused, but the browser may read why
    assert denied.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(f"{cors}/v1/completions", headers={**ask, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    off = httpx.post(f"{plain}/v1/completions", json=body, headers={"origin": "https://app.example"})
    assert off.status_code == 200 and "access-control-allow-origin" not in off.headers
