"""Traces across processes (zeroserve/tracing.py): one trace id through gateway, broker and
worker, with the parent links right, from a client's own traceparent; off, none is written."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx

from .conftest import Pipeline, start_gateway, wait_for


def spans_in(folder: Path) -> list[dict]:
    out = []
    for path in folder.glob("*.jsonl"):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def start_stack(pipeline: Pipeline, tiny_model: Path) -> str:
    pipeline.start_broker("--heartbeat-interval-s", "1")
    pipeline.start_worker("llm-0", "--model", str(tiny_model), "--served-name", "tiny",
                          "--max-num-seqs", "4", "--max-model-len", "256",
                          "--heartbeat-interval-s", "1", engine="llm")
    pipeline.wait_workers(1, timeout_s=120)
    return start_gateway(pipeline)


def test_one_trace_runs_through_gateway_broker_and_worker(pipeline, tiny_model, tmp_path,
                                                          monkeypatch) -> None:
    traces = tmp_path / "traces"
    traces.mkdir()
    monkeypatch.setenv("ZEROSERVE_TRACE_FILE", str(traces / "{service}-{pid}.jsonl"))
    url = start_stack(pipeline, tiny_model)
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
                   json={"model": "tiny", "stream": True, "max_tokens": 6, "ignore_eos": True,
                         "messages": [{"role": "user", "content": "trace me"}]})
    assert r.status_code == 200 and "[DONE]" in r.text
    names = {"POST /v1/chat/completions", "gateway.stream", "broker.queue", "worker.request",
             "worker.queue", "worker.prefill", "worker.decode"}

    def ours() -> dict[str, dict] | None:
        got = {s["name"]: s for s in spans_in(traces)
               if s["context"]["trace_id"] == f"0x{trace_id}"}
        return got if names <= got.keys() else None

    spans = wait_for(ours, 10)
    assert spans, f"spans missing: {names - {s['name'] for s in spans_in(traces)}}"

    def parent(name: str) -> str:
        return spans[name]["parent_id"]

    def span_id(name: str) -> str:
        return spans[name]["context"]["span_id"]

    server = "POST /v1/chat/completions"
    assert parent(server) == f"0x{client_span}"  # the client's traceparent was honoured
    assert spans[server]["kind"] == "SpanKind.SERVER"
    for child in ("gateway.stream", "broker.queue", "worker.request"):
        assert parent(child) == span_id(server), child
    for child in ("worker.queue", "worker.prefill", "worker.decode"):
        assert parent(child) == span_id("worker.request"), child
    services = {spans[n]["resource"]["attributes"]["service.name"] for n in names}
    assert services == {"zeroserve-gateway", "zeroserve-broker", "zeroserve-worker"}
    assert spans["worker.request"]["attributes"]["tokens"] == 6
    assert spans["worker.decode"]["end_time"] >= spans["worker.prefill"]["end_time"]


def test_untraced_processes_ignore_a_traced_request(pipeline, tiny_model, tmp_path,
                                                   monkeypatch) -> None:
    """Tracing on in the gateway only: the broker and worker serve its traced requests and
    make no spans (off, a process makes none whatever the header carries)."""
    monkeypatch.delenv("ZEROSERVE_TRACE_FILE", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    pipeline.start_broker("--heartbeat-interval-s", "1")
    pipeline.start_worker("llm-0", "--model", str(tiny_model), "--served-name", "tiny",
                          "--max-num-seqs", "4", "--max-model-len", "256",
                          "--heartbeat-interval-s", "1", engine="llm")
    pipeline.wait_workers(1, timeout_s=120)
    monkeypatch.setenv("ZEROSERVE_TRACE_FILE", str(tmp_path / "{service}-{pid}.jsonl"))
    url = start_gateway(pipeline)
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
    spans = wait_for(lambda: spans_in(tmp_path), 5)
    assert spans and {s["resource"]["attributes"]["service.name"] for s in spans} == {
        "zeroserve-gateway"}
    root = [s for s in spans if s["name"] == "POST /v1/completions"]
    assert len(root) == 1 and root[0]["parent_id"] is None  # a new trace, rooted here
    assert {s["name"] for s in spans} <= {"POST /v1/completions", "gateway.stream"}


def test_a_sampled_out_traceparent_is_served_and_counted(pipeline, tiny_model, tmp_path,
                                                         monkeypatch) -> None:
    """A client's traceparent with flags 00 (not sampled): the request is served, its span is
    not recorded, and the gateway finishes it as any other (no traceback, counted in
    /metrics)."""
    monkeypatch.setenv("ZEROSERVE_TRACE_FILE", str(tmp_path / "{service}-{pid}.jsonl"))
    url = start_stack(pipeline, tiny_model)
    trace_id = secrets.token_hex(16)
    for _ in range(3):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-00"},
                       json={"model": "tiny", "stream": True, "max_tokens": 3,
                             "messages": [{"role": "user", "content": "not sampled"}]})
        assert r.status_code == 200 and "[DONE]" in r.text

    def counted() -> bool:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        return any(line.startswith("zeroserve_requests_total")
                   and 'route="/v1/chat/completions"' in line and line.endswith(" 3.0")
                   for line in text.splitlines())

    assert wait_for(counted, 5), httpx.get(f"{url}/metrics", timeout=10).text[-2000:]
    log = next(p for p in pipeline.logs if p.name.startswith(f"gateway-{url.rsplit(':', 1)[1]}-"))
    assert "Traceback" not in log.read_text()
    assert not [s for s in spans_in(tmp_path) if s["context"]["trace_id"] == f"0x{trace_id}"]
