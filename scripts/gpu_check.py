#!/usr/bin/env python3
"""The steps of scripts/gpu_check.sh; prints one JSON summary as its last output.

Steps (each a child process with its own time limit, run from a scratch directory so the
installed package is imported, never the source tree):
  tests        the LLM tests with ZEROSERVE_TEST_DEVICE set (pytest, junit counts)
  parity       `bench parity`: greedy tokens of the engine vs transformers' generate, in the
               device's dtype on both sides (bfloat16 on CUDA)
  step         `bench step`: the decode step at batch 32 vs the model's forward alone, and
               the host synchronisations torch made on its own
  step_b128    the same at batch 128 (where the concurrency-128 serve runs), with the host's
               share of the step (`host_step_ms`)
  serve_c32    `bench serve` at concurrency 32 and 128 (small preset), with the engine,
  serve_c128   static-batch and HF-sequential baselines
  tensor       `bench tensor` with the tensor workers on the device
  step_compile (cuda only) `step` with --compile: decode attention compiled by inductor,
               reading the KV blocks in place (CUDA's default stays uncompiled until it wins)
  step_medium_b1, step_medium_b32  (cuda only) `bench step` of the medium preset (1.0B,
               bandwidth-bound) at batch 1 and 32, against its measured floor
Goals (from the issue): served tok/s at concurrency 128 at least 10x HF sequential and at
least 0.9x the static batch; the decode step at batch 32 within 1.5x of the forward alone.
--device cpu is the smoke run: the same steps on the tiny model at small sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from zeroserve.procs import stop

LLM_TESTS = ["tests/test_llm.py", "tests/test_sampler.py", "tests/test_logits.py",
             "tests/test_grammar.py"]


def plan(device: str, model: str) -> dict[str, list[str]]:
    """Each step's command line (after `python -m zeroserve.tooling.cli`, or pytest for tests)."""
    smoke = device == "cpu"
    serve = ["bench", "serve", "--model", model, "--device", device, "--json",
             "--baselines", "engine,static_batch,hf_sequential"]
    sizes = {32: "64", 128: "256"} if not smoke else {2: "4", 4: "8"}
    steps = {
        "tests": [*LLM_TESTS] if not smoke else ["tests/test_sampler.py", "tests/test_llm.py",
                                                 "-k", "parity or sampler or seeded"],
        "parity": ["bench", "parity", "--model", model, "--device", device, "--json",
                   "--prompts", "4" if smoke else "32", "--max-tokens", "8" if smoke else "64"],
        "step": ["bench", "step", "--model", model, "--device", device, "--json",
                 "--batch", "4" if smoke else "32", "--steps", "5" if smoke else "50"],
        # the batch the c128 serve runs at: is its step the engine's or the model's?
        "step_b128": ["bench", "step", "--model", model, "--device", device, "--json",
                      "--batch", "8" if smoke else "128", "--steps", "3" if smoke else "20"],
    }
    for i, (conc, n) in enumerate(sizes.items()):
        steps[f"serve_c{(32, 128)[i]}"] = [*serve, "--concurrency", str(conc),
                                           "--num-requests", n, "--sequential-requests",
                                           "1" if smoke else "8"]
    steps["tensor"] = ["bench", "tensor", "--device", device, "--json",
                       "--repeat", "3" if smoke else "30"]
    if not smoke:
        # decode attention compiled (inductor's Triton, reading the blocks in place) against
        # `step` (uncompiled, CUDA's default until this says otherwise)
        steps["step_compile"] = ["bench", "step", "--model", model, "--device", device,
                                 "--json", "--batch", "32", "--steps", "50", "--compile"]
        # last: building it takes a minute, and the figures above come first
        for b in (1, 32):
            steps[f"step_medium_b{b}"] = ["bench", "step", "--model", "medium", "--device",
                                          device, "--json", "--batch", str(b), "--steps", "20"]
    return steps


def run_step(name: str, cmd: list[str], cwd: Path, env: dict[str, str], limit_s: float,
             logs: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    log = logs / f"{name}.log"
    with open(log, "w") as err:  # pytest reports on stdout: all of it goes to the log
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=err if name == "tests" else
                                subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        timed_out = False
        try:
            stdout, _ = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stop(proc)  # its whole group: a bench stops the pipeline it started on SIGTERM
            stdout, timed_out = "", True
    out: dict[str, Any] = {"rc": proc.returncode}
    if timed_out:
        out.update(rc=124, error=f"over {limit_s:.0f} s")
    elif name != "tests":
        try:
            out.update(json.loads(stdout[stdout.index("{"):]))
        except ValueError:
            out["error"] = f"no JSON on stdout; see {log}"
    out["seconds"] = round(time.monotonic() - t0, 1)
    print(f"gpu_check: {name} rc={out['rc']} in {out['seconds']} s", file=sys.stderr,
          flush=True)
    return out


def junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    assert suite is not None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def goals(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    c128, step = res.get("serve_c128", {}), res.get("step", {})

    def goal(value: float | None, op: str, target: float) -> dict[str, Any]:
        met = value is not None and (value >= target if op == ">=" else value <= target)
        return {"value": value, "goal": f"{op} {target}", "met": met}

    return {
        "c128_served_over_hf_sequential": goal(c128.get("served_over_hf_sequential"), ">=", 10),
        "c128_served_over_static_batch": goal(c128.get("served_over_static_batch"), ">=", 0.9),
        "decode_step_over_forward_b32": goal(step.get("step_over_forward"), "<=", 1.5),
        "small_step_b32_ms": goal(min([r["decode_step_ms"] for r in (step, res.get(
            "step_compile", {})) if "decode_step_ms" in r], default=None), "<=", 1.5),
        "host_syncs_per_step": goal(step.get("host_syncs_per_step"), "<=", 1),
        "parity_divergences": goal(res.get("parity", {}).get("divergences"), "<=", 0),
        **{f"medium_step_over_floor_b{b}": goal(res[f"step_medium_b{b}"].get("step_over_floor"),
                                                "<=", 3) for b in (1, 32)
           if f"step_medium_b{b}" in res},
    }


def environment(device: str) -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30)
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default=None, help="default: small on cuda, tiny on cpu")
    ap.add_argument("--only", default="", help="comma-separated steps to run (default all)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--logs", type=Path, default=None,
                    help="each step's stderr goes here (default: a new temp dir, kept)")
    ap.add_argument("--step-limit-s", type=float, default=240)
    args = ap.parse_args(argv)
    model = args.model or ("small" if args.device == "cuda" else "tiny")
    t0 = time.monotonic()
    res: dict[str, Any] = environment(args.device)
    with tempfile.TemporaryDirectory(prefix="zs-gpu-check-") as tmp:
        scratch = Path(tmp)
        shutil.copytree(args.root / "tests", scratch / "tests")
        shutil.copy(args.root / "pyproject.toml", scratch / "pyproject.toml")  # pytest's ini
        logs = args.logs or Path(tempfile.mkdtemp(prefix="zs-gpu-check-logs-"))
        logs.mkdir(parents=True, exist_ok=True)
        res["logs"] = str(logs)
        env = {**os.environ, "ZEROSERVE_TEST_DEVICE": args.device, "PYTHONUNBUFFERED": "1",
               "ZEROSERVE_CACHE": str(scratch / "cache")}
        wanted = set(args.only.split(",")) - {""}
        for name, cmd in plan(args.device, model).items():
            if wanted and name not in wanted:
                continue
            if name == "tests":
                junit = logs / "junit.xml"
                full = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={junit}", *cmd]
                res[name] = {**run_step(name, full, scratch, env, args.step_limit_s, logs),
                             **junit_counts(junit)}
            else:
                full = [sys.executable, "-P", "-m", "zeroserve.tooling.cli", *cmd]
                res[name] = run_step(name, full, scratch, env, args.step_limit_s, logs)
    res["goals"] = goals(res)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["ok"] = all(step.get("rc") == 0 for step in res.values()
                    if isinstance(step, dict) and "rc" in step)
    text = json.dumps(res, indent=1, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
