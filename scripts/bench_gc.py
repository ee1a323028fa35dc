#!/usr/bin/env python3
"""What gc.freeze() after warmup buys the LLM engine's hot loop.

Runs the same engine workload twice in fresh processes, with and without gc.freeze() after
warmup, and prints the collector's pauses (count, total and longest ms, from gc.callbacks)
and the p99 step time. Usage: scripts/bench_gc.py [--model tiny] [--steps 1500] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time


def run_once(model: str, steps: int, freeze: bool) -> dict[str, float]:
    from zeroserve.config import LLMConfig, WorkerConfig
    from zeroserve.tooling.bench.stats import percentile
    from zeroserve.workers.llm.engine import LLMEngine

    eng = LLMEngine.from_config(WorkerConfig(
        broker="-", engine=LLMConfig(max_num_seqs=32, max_model_len=512), model=model))
    eng.warmup()
    gc.collect()
    if freeze:
        gc.freeze()
    pauses: list[float] = []
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((time.perf_counter() - started[0]) * 1000)

    gc.callbacks.append(on_gc)
    step_ms, n = [], 0
    while len(step_ms) < steps:
        while len(eng.seqs) < 32:
            eng.add((b"", f"r{n}"), {"prompt": f"request {n} " * 8, "max_tokens": 64,
                                     "ignore_eos": True, "temperature": 0.8}, [])
            n += 1
        t0 = time.perf_counter()
        eng.step()
        step_ms.append((time.perf_counter() - t0) * 1000)
    gc.callbacks.remove(on_gc)
    return {"gc_pauses": len(pauses), "gc_total_ms": round(sum(pauses), 2),
            "gc_max_ms": round(max(pauses, default=0.0), 3),
            "step_ms_p50": round(percentile(step_ms, 50), 3),
            "step_ms_p99": round(percentile(step_ms, 99), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=["freeze", "nofreeze"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_once(args.model, args.steps, args.child == "freeze")))
        return 0
    res = {}
    for mode in ("nofreeze", "freeze"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", args.model,
                              "--steps", str(args.steps)], capture_output=True, text=True,
                             check=True).stdout
        res[mode] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(res, indent=2) if args.json else
          "\n".join(f"{k:9} {v}" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
