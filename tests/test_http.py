"""The gateway's HTTP connections (gateway/http.py): idle, slow and oversized clients are cut
off with the right status, and the requests beside them go on. Real gateway, broker and echo
worker; raw sockets where a client misbehaves below HTTP."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Pipeline, start_gateway

LIMITS = ("--header-timeout-s", "1", "--body-timeout-s", "1", "--keep-alive-s", "1",
          "--max-header-bytes", "8192", "--max-connections", "12")


@pytest.fixture(scope="module")
def url():
    pipe = Pipeline(Path(tempfile.mkdtemp(prefix="zs-http-")))
    try:
        pipe.start_broker()
        pipe.start_worker("echo", "--model", "echo", "--step-delay-ms", "50")
        pipe.wait_workers(1)
        yield start_gateway(pipe, *LIMITS)
    finally:
        pipe.close()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _answer(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic()


def test_an_idle_connection_is_closed_after_the_header_timeout(url) -> None:
    sock = _connect(url)
    t0 = time.monotonic()
    data, t1 = _answer(sock)
    assert data == b"" and 0.8 < t1 - t0 < 4


def test_a_head_sent_slowly_gets_408(url) -> None:
    sock = _connect(url)
    t0 = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    for i in range(30):  # a header line every 0.2 s: never done
        try:
            sock.sendall(b"X-Drip-%d: y\r\n" % i)
        except OSError:
            break
        time.sleep(0.2)
    data, t1 = _answer(sock)
    assert data.startswith(b"HTTP/1.1 408") and b"request_timeout" in data
    assert t1 - t0 < 4


def test_a_head_too_large_gets_431(url) -> None:
    sock = _connect(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 1_000_000
                 + b"\r\n\r\n")
    data, _ = _answer(sock)
    assert data.startswith(b"HTTP/1.1 431") and b"header_too_large" in data
    with pytest.raises(httpx.HTTPStatusError):  # the same over a real client
        httpx.get(f"{url}/health", headers={"X-Big": "a" * 20_000}).raise_for_status()


def test_a_body_sent_slowly_gets_408(url) -> None:
    sock = _connect(url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
    data, _ = _answer(sock)
    assert data.startswith(b"HTTP/1.1 408") and b"body not received" in data


def test_a_kept_alive_connection_idles_out_and_a_long_stream_is_not_cut(url) -> None:
    with httpx.Client(base_url=url, timeout=20) as client:
        # 40 tokens at 50 ms a step: a response of 2 s, over every timeout of 1 s
        with client.stream("POST", "/v1/completions", json={
                "model": "echo", "prompt": " ".join(["t"] * 40), "max_tokens": 40,
                "stream": True}) as resp:
            lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1])
        assert text.split() == ["t"] * 40
    sock = _connect(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    t0 = time.monotonic()
    data, t1 = _answer(sock)  # answered, then closed by the keep-alive timer
    assert data.startswith(b"HTTP/1.1 200") and 0.8 < t1 - t0 < 4


def test_connections_beyond_the_limit_get_503_and_the_rest_still_serve(url) -> None:
    held = [_connect(url) for _ in range(12)]  # the limit
    time.sleep(0.2)
    extra = _connect(url)
    data, _ = _answer(extra)
    assert data.startswith(b"HTTP/1.1 503") and b"server_busy" in data
    for sock in held:
        sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_one_client_address_cannot_take_every_connection_and_hosts_are_checked() -> None:
    """Per client address, connections beyond --max-connections-per-client get 503 while
    another address is still served; without API keys, a Host that is not loopback, --host
    or --allowed-hosts gets 400 (DNS rebinding), and an allowed one is served."""
    pipe = Pipeline(Path(tempfile.mkdtemp(prefix="zs-http-")))
    try:
        pipe.start_broker()
        pipe.start_worker("echo", "--model", "echo", "--step-delay-ms", "50")
        pipe.wait_workers(1)
        url = start_gateway(pipe, "--max-connections", "12", "--max-connections-per-client",
                            "4", "--allowed-hosts", "api.internal")
        time.sleep(0.5)  # the readiness probe's connection is gone
        held = [_connect(url) for _ in range(4)]
        time.sleep(0.2)
        data, _ = _answer(_connect(url))
        assert data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data
        port = int(url.rsplit(":", 1)[1])
        other = socket.create_connection(("127.0.0.1", port), timeout=10,
                                         source_address=("127.0.0.2", 0))
        other.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        assert _answer(other)[0].startswith(b"HTTP/1.1 200")
        for sock in held:
            sock.close()
        time.sleep(0.2)
        for host, status in (("evil.example", 400), (f"evil.example:{port}", 400),
                             ("api.internal", 200), (f"127.0.0.1:{port}", 200),
                             (f"[::1]:{port}", 200), ("localhost", 200)):
            r = httpx.get(f"{url}/v1/models", headers={"host": host}, timeout=5)
            assert r.status_code == status, (host, r.text)
            if status == 400:
                assert r.json()["error"]["code"] == "host_not_allowed"
    finally:
        pipe.close()
