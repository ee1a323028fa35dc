"""`zeroserve bench serve`: serving throughput and latency against in-process baselines.

In the spirit of vLLM's benchmark_serving. N requests go through the SDK to a running pipeline
(broker + one LLM worker) at a fixed concurrency or a Poisson rate. Workloads (fixed seed):
  default        prompts of 32-256 tokens, outputs of 64-128 tokens
  shared-prefix  four system prompts of about 1,000 tokens; each request one of them plus a
                 unique 32-128-token user turn; 64 output tokens (what prefix caching is for)
  long           prompts of 4,096 tokens, 64 output tokens (on a model with sliding windows,
                 what the windowed KV groups save: see kv_tokens_used_peak below)
  mixed          interactive requests (3 in 4: prompts of 16-48 tokens, 16-32 out, priority 0)
                 among batch ones (prompts of 256-384 tokens, 128-192 out, priority 10),
                 arriving at --rate (default 12/s: past a tiny model's capacity on 2 cores);
                 no in-process baselines. With --goodput ttft:MS,tpot:MS each run reports
                 goodput_rps (requests/s that met both SLOs) and, per class,
                 interactive_goodput_rps, interactive_ttft_ms_p99, batch_tok_s; with
                 `--compare scheduling=fcfs` the same under arrival order
Then, with the pipeline stopped so nothing competes for the cores, the same requests run
in-process as baselines (baselines.py), in the worker's dtype:
  engine_tok_s          zeroserve's engine alone, no sockets: what the pipeline costs
  hf_sequential_tok_s   one model.generate at a time (on the first --sequential-requests)
  static_batch_tok_s    padded static batches of `concurrency` requests
  hf_continuous_tok_s   transformers' continuous batching manager, warmed before timing
(--baselines picks which; --device cuda runs the worker and the baselines on the GPU.)
--compare FLAG[=VALUE] runs the same pipeline again with one worker flag changed (e.g.
`--compare no-prefix-caching`, `--compare max-num-seqs=8`, `--compare dtype=float32`) and
prints its figures under that name beside the main run's. Each run also reports the worker's
own figures: max_running (most sequences in one batch), prefix_hit_rate, preemptions, and its
KV: kv_tokens_used_peak (KV in use at its peak, in tokens of every layer) beside
kv_tokens_full_attention_peak (the same sequences if every layer kept every token), and per
windowed layer group the most blocks one sequence held while decoding, with its bound
(window / block size + 2).
--rounds N alternates the served run and the in-process engine N times and reports the
medians (and every round), so served/engine holds up on a noisy machine.
With --via sdk --via http, the same pipeline is driven through the SDK and through the HTTP
gateway (OpenAI SSE), one after the other. With --peer transformers-serve, `transformers serve
--continuous-batching` is started on the same model afterwards and driven over HTTP with the
same requests. Prompts are random token ids decoded to text, so every path sees the same text;
decoding is greedy with no ignore_eos (the peer refuses it), so every path makes the same tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from zeroserve.procs import exit_on_sigterm, spawn, stop_all
from zeroserve.tooling.bench import baselines
from zeroserve.tooling.bench.drivers import (
    drive_http,
    drive_sdk,
    idle_ttft,
    make_workload,
    summarize,
)
from zeroserve.tooling.bench.stats import report

BASELINES = ("engine", "static_batch", "hf_continuous", "hf_sequential")


def serve_phase(model_dir: Path, workload: list, concurrency: int, rate: float | None,
                worker_flags: list[str], via: list[str],
                goodput: tuple[float, float] | None = None) -> dict[str, dict[str, float]]:
    """Start broker + one LLM worker (+ gateway for http) and drive it each way in `via`;
    "worker" holds the worker's own figures after the last run."""
    from zeroserve.tooling.up import wait_ready

    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="zs-bench-") as tmp:
        front, back = f"ipc://{tmp}/f", f"ipc://{tmp}/b"
        # a benchmark measures throughput: nothing may time out in the broker's queue
        procs = [spawn("broker", ["--frontend", front, "--backend", back,
                                  "--admin", f"ipc://{tmp}/a", "--max-queue-wait-ms",
                                  "3600000", "--log-level", "WARNING"]),
                 spawn("worker", ["--broker", back, "--engine", "llm", "--model",
                                  str(model_dir), "--served-name", "bench", *worker_flags,
                                  "--log-level", "WARNING"])]
        port = _free_port()
        if "http" in via:
            procs.append(spawn("gateway", ["--broker", front, "--port", str(port),
                                           "--cache-mb", "0", "--log-level", "WARNING"]))
        try:
            if not wait_ready(front, 1, 600, procs):
                raise RuntimeError("the pipeline did not come up")
            if "sdk" in via and "http" in via:
                _wait_http(f"http://127.0.0.1:{port}/ready")
                out["idle"] = asyncio.run(idle_ttft(front, f"http://127.0.0.1:{port}",
                                                    workload))
            for kind in via:
                if kind == "sdk":
                    records, elapsed = asyncio.run(drive_sdk(front, "bench", workload,
                                                             concurrency, rate))
                else:
                    _wait_http(f"http://127.0.0.1:{port}/ready")
                    records, elapsed = asyncio.run(drive_http(
                        f"http://127.0.0.1:{port}", "bench", workload, concurrency, rate, kind))
                out[kind] = summarize(records, elapsed, goodput)
            out["worker"] = worker_figures(front)
        finally:
            stop_all(procs)
    return out


def worker_figures(endpoint: str) -> dict[str, float]:
    """The worker's own figures once the run is over (they travel on its heartbeats)."""
    from zeroserve.client import Client

    with Client(endpoint) as client:
        deadline = time.monotonic() + 10
        while True:
            stats = client.workers()[0].get("stats") or {}
            if stats.get("running") == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(1.5)  # one more heartbeat: the final counters
        stats = client.workers()[0].get("stats") or {}
    out = {"max_running": stats.get("max_running", 0),
           "prefix_hit_rate": stats.get("prefix_cache_hit_rate", 0.0),
           "preemptions": stats.get("preemptions", 0),
           "kv_tokens_used_peak": stats.get("kv_tokens_used_peak", 0),
           "kv_tokens_full_attention_peak": stats.get("kv_tokens_full_attention_peak", 0)}
    if out["kv_tokens_full_attention_peak"]:
        out["kv_used_over_full_attention"] = (out["kv_tokens_used_peak"]
                                              / out["kv_tokens_full_attention_peak"])
    bs = stats.get("kv_block_size", 1)
    for g in stats.get("kv_groups", []):
        if g["window"]:
            out[f"window_{g['window']}_blocks_per_seq_max"] = g["max_decode_held"]
            out[f"window_{g['window']}_blocks_per_seq_bound"] = g["window"] // bs + 2
    return out


def peer_phase(model_dir: Path, workload: list, concurrency: int,
               rate: float | None) -> dict[str, float]:
    """`transformers serve --continuous-batching` on the same model, the same requests."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    port = _free_port()
    proc = subprocess.Popen([exe, "serve", str(model_dir), "--continuous-batching",
                             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
        records, elapsed = asyncio.run(drive_http(f"http://127.0.0.1:{port}", str(model_dir),
                                                  workload, concurrency, rate, "peer"))
    finally:
        stop_all([proc])
    return summarize(records, elapsed)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: Any = None, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up")


def baseline_phase(res: dict[str, Any], args: argparse.Namespace, model_dir: Path,
                   workload: list, via: list[str], chosen: set[str], device: str,
                   dtype: str) -> None:
    """The in-process baselines in `chosen`, with the pipeline stopped; engine rounds
    alternate with served rounds (--rounds)."""
    import torch

    if "engine" in chosen:
        from zeroserve.workers.worker import build_parser, config_from_args

        wargs = build_parser().parse_args(["--engine", "llm", "--model", str(model_dir),
                                           "--broker", "-", *worker_flags(args)])
        cfg = config_from_args(wargs, ())
        # served vs engine alone: --rounds alternates the two and keeps the medians, so the
        # ratio survives a noisy machine
        served = [res["served_tok_s"]]
        engine = [baselines.engine(model_dir, workload, args.concurrency, cfg)]
        for _ in range(args.rounds - 1):
            again = serve_phase(model_dir, workload, args.concurrency, args.rate,
                                worker_flags(args), via[:1])
            served.append(again[via[0]]["served_tok_s"])
            engine.append(baselines.engine(model_dir, workload, args.concurrency, cfg))
        if args.rounds > 1:
            res["served_tok_s_rounds"], res["engine_tok_s_rounds"] = served, engine
            res["served_tok_s"] = statistics.median(served)
        res["engine_tok_s"] = statistics.median(engine)
    torch.manual_seed(0)
    model = baselines.load(model_dir, dtype, device=device)
    if "static_batch" in chosen:
        res["static_batch_tok_s"] = baselines.static_batches(model, workload, args.concurrency)
    if "hf_sequential" in chosen:
        res["hf_sequential_tok_s"] = baselines.hf_sequential(
            model, workload[:args.sequential_requests])
    if "hf_continuous" in chosen:
        res["hf_continuous_tok_s"] = baselines.hf_continuous(model, workload, args.concurrency)
    for name in BASELINES:
        if name in chosen:
            res[f"served_over_{name}"] = res["served_tok_s"] / res[f"{name}_tok_s"]


GOODPUT_KEYS = ("goodput_rps", *(f"{kind}_{k}" for kind in ("interactive", "batch") for k in (
    "goodput_rps", "tok_s", "ttft_ms_p99", "tpot_ms_p50")))


def _slos(text: str) -> tuple[float, float]:
    """"ttft:500,tpot:150" -> (500.0, 150.0)."""
    slos = dict(part.split(":", 1) for part in text.split(","))
    return float(slos["ttft"]), float(slos["tpot"])


def worker_flags(args: argparse.Namespace, change: str = "") -> list[str]:
    """The worker's command line for this run; `change` is one --compare entry."""
    flags = {"max-num-seqs": str(args.max_num_seqs or max(args.concurrency, 8)),
             "max-model-len": str(args.max_model_len), "dtype": args.dtype,
             "device": args.device}
    for name in ("kv-cache-tokens", "block-size", "max-batched-tokens"):  # 0: worker default
        if value := getattr(args, name.replace("-", "_")):
            flags[name] = str(value)
    switches = {"no-prefix-caching"} if args.no_prefix_caching else set()
    if change:
        name, _, value = change.partition("=")
        if value:
            flags[name] = value
        else:
            switches.add(name)
    return [x for k, v in flags.items() for x in (f"--{k}", v)] + [f"--{s}" for s in switches]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zeroserve bench serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset or model directory")
    ap.add_argument("--workload", choices=["default", "shared-prefix", "long", "mixed"],
                    default="default")
    ap.add_argument("--goodput", default=None, metavar="ttft:MS,tpot:MS",
                    help="SLOs a request must meet to count in goodput_rps")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    ap.add_argument("--via", action="append", choices=["sdk", "http"],
                    help="drive the pipeline this way (repeat for both; default sdk)")
    ap.add_argument("--peer", choices=["transformers-serve"], default=None)
    ap.add_argument("--compare", action="append", default=[], metavar="FLAG[=VALUE]",
                    help="run again with this worker flag changed (repeatable)")
    ap.add_argument("--sequential-requests", type=int, default=8,
                    help="requests the one-at-a-time baseline runs (it is slow)")
    ap.add_argument("--max-model-len", type=int, default=0, help="0: fit the workload")
    ap.add_argument("--max-num-seqs", type=int, default=0, help="0: max(concurrency, 8)")
    ap.add_argument("--kv-cache-tokens", type=int, default=0, help="0: the worker's default")
    ap.add_argument("--max-batched-tokens", type=int, default=0, help="0: the worker's default")
    ap.add_argument("--block-size", type=int, default=0, help="0: the worker's default")
    ap.add_argument("--dtype", default="auto", help="the worker's and the baselines' dtype")
    ap.add_argument("--device", default="cpu", help="the worker's and the baselines' device: "
                                                    "cpu or cuda (the worker takes cuda:0)")
    ap.add_argument("--baselines", default=",".join(BASELINES),
                    help=f"which in-process baselines to run, of {','.join(BASELINES)}")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the served run and the in-process engine this many times")
    ap.add_argument("--json", action="store_true")
    return ap


def _served(res: dict[str, Any], phases: dict[str, Any], via: list[str]) -> None:
    """The served run's figures: the first path's as they are, every path's prefixed."""
    idle = phases.pop("idle", None)
    res.update(phases.pop("worker"))
    res.update(phases[via[0]])  # served_tok_s, ttft_ms_p50, ... of the first path
    for kind, figures in phases.items():
        res[f"{kind}_tok_s"] = figures["served_tok_s"]
        for k in ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "itl_ms_p99", "requests_failed"):
            res[f"{kind}_{k}"] = figures[k]
    if idle is not None:
        res["http_over_sdk_tok_s"] = res["http_tok_s"] / res["sdk_tok_s"]
        res.update(idle)
        res["gateway_ttft_ms_p50_added"] = (idle["http_idle_ttft_ms_p50"]
                                            - idle["sdk_idle_ttft_ms_p50"])


def _compared(res: dict[str, Any], change: str, again: dict[str, Any], path: str) -> None:
    """A --compare run's figures, prefixed with its flag, and its ratios to the served run."""
    label = change.replace("-", "_").replace("=", "_")
    figures = {**again[path], **again["worker"]}
    for k in ("served_tok_s", "ttft_ms_p50", "ttft_ms_p99", "max_running",
              "prefix_hit_rate", "requests_failed", *GOODPUT_KEYS):
        if k in figures:
            res[f"{label}_{k}"] = figures[k]
    res[f"served_over_{label}"] = res["served_tok_s"] / figures["served_tok_s"]
    res[f"ttft_p50_{label}_over_served"] = figures["ttft_ms_p50"] / res["ttft_ms_p50"]


def _peered(res: dict[str, Any], peer: dict[str, Any]) -> None:
    """The peer server's figures and the served run's ratios to them."""
    res["peer_tok_s"] = peer["served_tok_s"]
    res["peer_ttft_ms_p50"] = peer["ttft_ms_p50"]
    res["peer_ttft_ms_p99"] = peer["ttft_ms_p99"]
    res["peer_requests_failed"] = peer["requests_failed"]
    res["served_over_peer_tok_s"] = res["served_tok_s"] / res["peer_tok_s"]
    if "http_tok_s" in res:
        res["http_over_peer_tok_s"] = res["http_tok_s"] / res["peer_tok_s"]
        res["http_over_peer_ttft_p99"] = res["http_ttft_ms_p99"] / res["peer_ttft_ms_p99"]


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    exit_on_sigterm()  # a benchmark killed by `timeout` still stops its pipeline
    via = args.via or ["sdk"]
    goodput = _slos(args.goodput) if args.goodput else None
    if args.workload == "mixed":  # requests queue in the pipeline (where priority acts), not
        # in this client: every arrival is sent, and the batch is smaller than the backlog
        args.rate, args.skip_baselines = args.rate or 12.0, True
        args.concurrency = max(args.concurrency, args.num_requests)
        args.max_num_seqs = args.max_num_seqs or 16
    args.max_model_len = args.max_model_len or {"shared-prefix": 2048, "long": 4096 + 256,
                                                 "mixed": 1024}.get(args.workload, 512)

    import torch
    from transformers import AutoTokenizer

    from zeroserve.models import resolve
    from zeroserve.workers.llm.model_runner import pick_dtype

    model_dir = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    workload = make_workload(args.num_requests, tokenizer, kind=args.workload)
    device = "cuda:0" if args.device == "cuda" else args.device
    dtype = str(pick_dtype(args.dtype, torch.device(device))[0]).removeprefix("torch.")
    chosen = set(args.baselines.split(",")) - {""}
    if chosen - set(BASELINES):
        ap.error(f"--baselines: unknown {', '.join(sorted(chosen - set(BASELINES)))}")
    res: dict[str, Any] = {"concurrency": args.concurrency, "num_requests": args.num_requests,
                           "model": str(args.model), "workload": args.workload, "dtype": dtype,
                           "device": device}
    phases = serve_phase(model_dir, workload, args.concurrency, args.rate,
                         worker_flags(args), via, goodput)
    _served(res, phases, via)
    for change in args.compare:
        _compared(res, change, serve_phase(model_dir, workload, args.concurrency, args.rate,
                                           worker_flags(args, change), via[:1], goodput), via[0])
    if args.peer:
        _peered(res, peer_phase(model_dir, workload, args.concurrency, args.rate))
    if not args.skip_baselines and chosen:
        baseline_phase(res, args, model_dir, workload, via, chosen, device, dtype)
    report(res, args.json, f"zeroserve bench serve (concurrency {args.concurrency})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
