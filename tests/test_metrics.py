"""gateway/metrics.py through a real gateway: the engine's figures per worker move after a
request, the same figures appear under vLLM's names with --metrics-vllm-names, and the
Grafana dashboard queries only exported names."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import wait_for


def test_engine_metrics_per_worker_move_and_carry_vllm_names(stack) -> None:  # noqa: F811
    _, url, _ = stack

    def samples() -> dict[tuple[str, str], float]:
        text = httpx.get(f"{url}/metrics").text
        return {(s.name, s.labels.get("worker") or s.labels.get("model_name") or
                 s.labels.get("model", "")): s.value
                for f in text_string_to_metric_families(text) for s in f.samples
                if not s.labels.get("le")}

    before = samples()
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "count me",
                                                  "max_tokens": 5, "temperature": 0,
                                                  "ignore_eos": True})
    assert r.status_code == 200
    gen = ("zeroserve_worker_generation_tokens_total", "llm")
    after = wait_for(lambda: (s := samples())[gen] >= before[gen] + 5 and s, 5)
    assert after, "the worker's generated tokens never moved"
    for name in ("zeroserve_worker_steps_total", "zeroserve_worker_step_seconds_count",
                 "zeroserve_worker_prompt_tokens_total", "zeroserve_worker_decode_tokens_total",
                 "zeroserve_worker_prefill_tokens_total"):
        assert after[(name, "llm")] > before[(name, "llm")], name
    assert after[("zeroserve_worker_busy_seconds_total", "llm")] == pytest.approx(
        after[("zeroserve_worker_step_seconds_sum", "llm")])
    # the same figures under vLLM's names, label model_name
    assert after[("vllm:generation_tokens_total", "llm")] == after[gen]
    assert ("vllm:num_requests_running", "llm") in after
    assert ("vllm:kv_cache_usage_perc", "llm") in after
    assert after[("vllm:e2e_request_latency_seconds_count", "tiny")] >= 1
    assert after[("zeroserve_time_to_first_token_seconds_count", "tiny")] == after[
        ("vllm:time_to_first_token_seconds_count", "tiny")]
    # the broker's routing decisions: a prompt of a full prefix block was routed cold first
    assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "route me " * 20,
                                                     "max_tokens": 1}).status_code == 200

    def routed() -> float:
        return sum(s.value for f in text_string_to_metric_families(
            httpx.get(f"{url}/metrics").text) for s in f.samples
            if s.name == "zeroserve_routed_requests")

    assert wait_for(lambda: routed() >= 1, 5)
    # an echo reply's tokens come a step (20 ms) apart: inter-token latency has samples even
    # when the tiny model's chunks merge on their way (a reader that lags gets them merged)
    assert httpx.post(f"{url}/v1/completions", json={"model": "echo", "prompt": "a b c d e",
                                                     "max_tokens": 5}).status_code == 200
    secure = httpx.get(f"{stack[2]}/metrics", headers={"authorization": "Bearer sk-full-access"})
    assert "vllm:" not in secure.text  # off by default
    # the Grafana dashboard in the repo queries only what /metrics exports
    board = (Path(__file__).parent.parent / "scripts" / "grafana" / "zeroserve.json").read_text()
    queried = set(re.findall(r"zeroserve_[a-z_]+", board))
    exported = set(re.findall(r"^(zeroserve_[a-z_]+)", httpx.get(f"{url}/metrics").text,
                              re.MULTILINE))
    assert len(queried) >= 15 and queried <= exported, queried - exported


def _count(text: str, family: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == family and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_several_gateway_processes_export_one_set_of_figures(pipeline) -> None:
    """`gateway --workers 2`: each scrape, whichever process answers it, counts every
    request either process served (each process used to show only its own)."""
    from .conftest import start_gateway

    pipeline.start_broker()
    pipeline.start_worker("echo")
    pipeline.wait_workers(1)
    url = start_gateway(pipeline, "--workers", "2")
    done = 0
    for i in range(24):  # new connections: the kernel spreads them over both processes
        res = httpx.post(f"{url}/v1/completions", json={
            "model": "echo", "prompt": f"p{i}", "max_tokens": 1}, timeout=10)
        done += res.status_code == 200
    assert done == 24
    seen = set()
    for _ in range(8):
        text = httpx.get(f"{url}/metrics", timeout=10).text
        seen.add(_count(text, "zeroserve_requests_total", route="/v1/completions",
                        status="200"))
        assert _count(text, "zeroserve_workers_up") == 1  # a gauge: the table, not a sum
    assert seen == {24.0}
