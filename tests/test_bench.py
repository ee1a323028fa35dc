"""Benchmarks as smoke tests on the tiny model: they run end to end and report real figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def bench(*args: str) -> dict:
    proc = subprocess.Popen([sys.executable, "-m", "zeroserve.tooling.cli", "bench", *args,
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # SIGTERM: the bench then stops the pipeline it started
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0
    return json.loads(out)


@pytest.mark.timeout(300)
def test_bench_serve_shared_prefix_hits_the_cache_and_the_comparison_does_not(tiny_model):
    res = bench("serve", "--model", str(tiny_model), "--workload", "shared-prefix",
                "--num-requests", "12", "--concurrency", "4", "--skip-baselines",
                "--compare", "no-prefix-caching")
    assert res["requests_failed"] == 0 and res["no_prefix_caching_requests_failed"] == 0
    # four ~1,000-token system prompts shared by 12 requests: at most 8 can hit, fewer when
    # two with one prefix start together (timing): well above 0 is the behaviour
    assert res["prefix_hit_rate"] > 0.3
    assert res["no_prefix_caching_prefix_hit_rate"] == 0
    assert res["requests_ok"] == 12 and 12 <= res["completion_tokens"] <= 12 * 64  # 64 each
    assert 1 < res["max_running"] <= 4  # batched, never past the concurrency it was given
    assert res["ttft_ms_p99"] >= res["ttft_ms_p50"] > 0 and res["tpot_ms_p50"] > 0
    assert res["served_over_no_prefix_caching"] == pytest.approx(
        res["served_tok_s"] / res["no_prefix_caching_served_tok_s"])


@pytest.mark.timeout(300)
def test_bench_stall_reports_both_rounds(tiny_model):
    # 200 tokens: a round of 40 (~50 ms) could fall wholly inside one stall of this shared
    # host, every stream's reply then arriving in one piece, leaving no gap to measure
    res = bench("stall", "--model", str(tiny_model), "--streams", "4", "--max-tokens", "200",
                "--big-chars", "20000")
    assert res["quiet_itl_ms_p99"] >= res["quiet_itl_ms_p50"] > 0
    assert res["big_itl_ms_p99"] >= res["big_itl_ms_p50"] > 0
    assert res["itl_p99_added_ms"] == pytest.approx(res["big_itl_ms_p99"]
                                                    - res["quiet_itl_ms_p99"])
    assert res["big_prompt_answered_ms"] > 0


@pytest.mark.timeout(300)
def test_bench_transport_curve_reports_both_sides():
    res = bench("transport", "--curve", "--rtt-requests", "200", "--throughput-requests",
                "2000")
    for path in ("direct", "proxy", "broker", "tcp", "curve"):
        assert res[f"{path}_rtt_us_p99"] >= res[f"{path}_rtt_us_p50"] > 0, path
        assert res[f"{path}_msgs_per_s"] > 0, path
    # the broker is one more process on the path than a direct connection
    assert res["broker_rtt_us_p50"] > res["direct_rtt_us_p50"]
    assert res["broker_over_proxy_rtt_p50"] == pytest.approx(
        res["broker_rtt_us_p50"] / res["proxy_rtt_us_p50"])
    assert res["curve_over_tcp_rtt_p50"] > 0 and res["curve_over_tcp_msgs"] > 0


@pytest.mark.timeout(300)
def test_bench_structured_reports_both_kinds(tiny_model):
    res = bench("structured", "--model", str(tiny_model), "--requests", "4", "--concurrency",
                "4", "--max-tokens", "200", "--rounds", "1")
    assert res["free_tok_s"] > 0 and res["constrained_tok_s"] > 0
    assert res["constrained_total"] == 4 and res["ratio_median_of_rounds"] > 0


@pytest.mark.timeout(300)
def test_bench_slowloris_holds_the_connections_and_reports_both_rounds():
    res = bench("slowloris", "--idle", "40", "--slow", "5", "--round-s", "2", "--rounds", "1")
    assert res["idle_connections"] == 40 and res["requests"] > 10
    assert res["quiet_p50_ms"] > 0 and res["loaded_p50_ms"] > 0


@pytest.mark.timeout(300)
def test_bench_step_runs_more_steps_than_its_old_token_budget_and_reports_the_host_share(
        tiny_model):
    # 40 steps: the timed and host-share passes outlast steps + 32 tokens (it used to crash)
    res = bench("step", "--model", str(tiny_model), "--batch", "8", "--prompt-tokens", "32",
                "--steps", "40", "--dtype", "float32")
    assert res["batch"] == 8 and res["steps"] == 40
    assert 0 < res["host_step_ms"] < res["decode_step_ms"]  # the forward costs something
    assert res["step_over_forward"] > 0.5
    # the floor: the weights' and the contexts' K and V bytes over the read rate, or the
    # FLOPs over the matmul rate; 8 contexts of 16-48 tokens and 20-24 more, at the tiny
    # model's 2 layers x 2 x 2 KV heads x 32 dims x 4 bytes a token
    assert 8 * (16 + 20) * 1024 <= res["kv_gb"] * 1e9 <= 8 * (48 + 24) * 1024
    weight_ms = (res["weight_gb"] + res["kv_gb"]) / res["read_gb_s"] * 1000
    flop_ms = 2 * 8 * res["weight_gb"] / 4 / res["matmul_tflops"]  # float32: 4 bytes a weight
    assert res["floor_ms"] == pytest.approx(max(weight_ms, flop_ms), rel=1e-6)
    assert res["step_over_floor"] == pytest.approx(res["decode_step_ms"] / res["floor_ms"])
    assert res["step_over_floor"] > 1  # nothing beats what the machine can read


@pytest.mark.timeout(300)
def test_bench_step_with_prompts_that_prefill_over_many_steps(tiny_model):
    # 32 prompts of 256-768 tokens prefill over 8 steps of 2,048 tokens, and the first to
    # finish decodes meanwhile: its budget covers those tokens too (it used to run out)
    res = bench("step", "--model", str(tiny_model), "--batch", "32", "--prompt-tokens", "512",
                "--steps", "5", "--dtype", "float32")
    assert res["batch"] == 32 and res["decode_step_ms"] > 0 and res["host_step_ms"] > 0


@pytest.mark.timeout(300)
def test_bench_serve_mixed_reports_goodput_by_class(tiny_model):
    res = bench("serve", "--model", str(tiny_model), "--workload", "mixed", "--num-requests",
                "16", "--rate", "50", "--goodput", "ttft:60000,tpot:60000")
    assert res["requests_failed"] == 0
    # with SLOs nobody misses, goodput is the request rate, split by class
    assert res["goodput_rps"] == pytest.approx(res["request_throughput_per_s"])
    assert res["interactive_goodput_rps"] + res["batch_goodput_rps"] == pytest.approx(
        res["goodput_rps"])
    assert res["batch_tok_s"] > 0 and res["interactive_tok_s"] > 0
