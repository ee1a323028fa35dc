"""`zeroserve bench serve`: serving throughput and latency against in-process baselines.

In the spirit of vLLM's benchmark_serving. N requests (prompt lengths 32-256 tokens, outputs
64-128 tokens, fixed seed) go through the SDK to a running pipeline (broker + one LLM worker)
at a fixed concurrency or a Poisson rate. Then, with the pipeline stopped so nothing competes
for the cores, the same requests run in-process as baselines:
  hf_sequential_tok_s   one model.generate at a time (on the first --sequential-requests)
  static_batch_tok_s    padded static batches of `concurrency` requests: the ceiling without
                        serving (only each request's own tokens count)
  hf_continuous_tok_s   transformers' continuous batching manager, created once and warmed
                        before timing, fed the same requests at the same concurrency
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from zeroserve.bench.stats import percentile, report
from zeroserve.procs import spawn, stop_all


@dataclass
class Record:
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    tokens: int = 0
    itls_s: list[float] = field(default_factory=list)
    error: str = ""


def make_workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(16, vocab) for _ in range(rng.randint(32, 256))],
             rng.randint(64, 128)) for _ in range(n)]


async def drive_sdk(endpoint: str, model: str, workload: list[tuple[list[int], int]],
                    concurrency: int, rate: float | None) -> tuple[list[Record], float]:
    from zeroserve.client import AsyncClient

    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(workload), desc="served requests", leave=False)
    rng = random.Random(1)

    async def one(client: AsyncClient, ids: list[int], n: int) -> Record:
        rec = Record()
        async with sem:
            t0 = last = time.perf_counter()
            try:
                async for chunk in client.stream(model, prompt_token_ids=ids, max_tokens=n,
                                                 temperature=0, ignore_eos=True):
                    now = time.perf_counter()
                    if chunk.token_ids:
                        if rec.tokens == 0:
                            rec.ttft_s = now - t0
                        else:
                            rec.itls_s.append(now - last)
                        rec.tokens += len(chunk.token_ids)
                        last = now
            except Exception as exc:
                rec.error = repr(exc)
            rec.e2e_s = time.perf_counter() - t0
        bar.update()
        return rec

    async with AsyncClient(endpoint) as client:
        await client.generate(model, prompt_token_ids=workload[0][0][:8], max_tokens=2)
        t0 = time.perf_counter()
        tasks = []
        for ids, n in workload:
            tasks.append(asyncio.create_task(one(client, ids, n)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    bar.close()
    return list(records), elapsed


def summarize(records: list[Record], elapsed: float) -> dict[str, float]:
    ok = [r for r in records if not r.error]
    tokens = sum(r.tokens for r in ok)
    tpots = [(r.e2e_s - r.ttft_s) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itls = [x for r in ok for x in r.itls_s]
    return {
        "requests_ok": len(ok),
        "requests_failed": len(records) - len(ok),
        "request_throughput_per_s": len(ok) / elapsed,
        "served_tok_s": tokens / elapsed,
        "ttft_ms_p50": percentile([r.ttft_s for r in ok], 50) * 1000,
        "ttft_ms_p99": percentile([r.ttft_s for r in ok], 99) * 1000,
        "tpot_ms_p50": percentile(tpots, 50) * 1000,
        "tpot_ms_p99": percentile(tpots, 99) * 1000,
        "itl_ms_p99": percentile(itls, 99) * 1000,
    }


def serve_phase(model_dir: Path, workload: list, concurrency: int, rate: float | None,
                max_model_len: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="zs-bench-") as tmp:
        front, back = f"ipc://{tmp}/f", f"ipc://{tmp}/b"
        broker = spawn("broker", ["--frontend", front, "--backend", back,
                                  "--log-level", "WARNING"])
        worker = spawn("worker", ["--broker", back, "--engine", "llm", "--model",
                                  str(model_dir), "--served-name", "bench",
                                  "--max-num-seqs", str(max(concurrency, 8)),
                                  "--max-model-len", str(max_model_len),
                                  "--log-level", "WARNING"])
        try:
            from zeroserve.up import wait_ready

            if not wait_ready(front, 1, 600, [broker, worker]):
                raise RuntimeError("the pipeline did not come up")
            records, elapsed = asyncio.run(drive_sdk(front, "bench", workload, concurrency,
                                                     rate))
        finally:
            stop_all([worker, broker])
    return summarize(records, elapsed)


# -- in-process baselines ----------------------------------------------------------------


def _load(model_dir: Path, attn: str = "sdpa"):  # -> model
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation=attn).eval()


def hf_sequential(model: Any, workload: list) -> float:
    import torch

    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for ids, n in tqdm(workload, desc="hf sequential", leave=False):
            model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            tokens += n
    return tokens / (time.perf_counter() - t0)


def static_batches(model: Any, workload: list, concurrency: int) -> float:
    import torch

    tokens, t0 = 0, time.perf_counter()
    batches = [workload[i:i + concurrency] for i in range(0, len(workload), concurrency)]
    with torch.inference_mode():
        for batch in tqdm(batches, desc="static batches", leave=False):
            width = max(len(ids) for ids, _ in batch)
            inp = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, (ids, _) in enumerate(batch):  # left padding
                inp[i, width - len(ids):] = torch.tensor(ids)
                mask[i, width - len(ids):] = 1
            n = max(out for _, out in batch)
            model.generate(inp, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            tokens += sum(out for _, out in batch)  # only each request's own tokens count
    return tokens / (time.perf_counter() - t0)


def hf_continuous(model: Any, workload: list, concurrency: int) -> float:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=128, do_sample=False, use_cuda_graph=False)
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    try:
        # warm: one round of requests before the clock starts
        warm = [manager.add_request(ids, max_new_tokens=8) for ids, _ in workload[:concurrency]]
        _collect(manager, len(warm))
        pending = list(workload)
        tokens, t0 = 0, time.perf_counter()
        in_flight = 0
        bar = tqdm(total=len(workload), desc="hf continuous", leave=False)
        while pending or in_flight:
            while pending and in_flight < concurrency:
                ids, n = pending.pop(0)
                manager.add_request(ids, max_new_tokens=n)
                in_flight += 1
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError("transformers' manager stopped answering")
            if result.is_finished():
                in_flight -= 1
                tokens += len(result.generated_tokens)
                bar.update()
        bar.close()
        return tokens / (time.perf_counter() - t0)
    finally:
        manager.stop(block=True, timeout=30)  # never leave it running: it keeps us alive


def _collect(manager: Any, n: int) -> None:
    done = 0
    while done < n:
        result = manager.get_result(timeout=60)
        if result is None:
            raise RuntimeError("transformers' manager stopped answering")
        done += result.is_finished()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve bench serve", description=__doc__)
    ap.add_argument("--model", default="small", help="preset or model directory")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second")
    ap.add_argument("--sequential-requests", type=int, default=8,
                    help="requests the one-at-a-time baseline runs (it is slow)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from zeroserve.models import resolve

    model_dir = resolve(args.model)
    vocab = _vocab_size(model_dir)
    workload = make_workload(args.num_requests, vocab)
    res: dict[str, Any] = {"concurrency": args.concurrency, "num_requests": args.num_requests,
                           "model": str(args.model)}
    res.update(serve_phase(model_dir, workload, args.concurrency, args.rate,
                           args.max_model_len))
    if not args.skip_baselines:
        torch.manual_seed(0)
        model = _load(model_dir)
        res["static_batch_tok_s"] = static_batches(model, workload, args.concurrency)
        res["hf_sequential_tok_s"] = hf_sequential(model, workload[:args.sequential_requests])
        res["hf_continuous_tok_s"] = hf_continuous(model, workload, args.concurrency)
        res["served_over_static"] = res["served_tok_s"] / res["static_batch_tok_s"]
        res["served_over_hf_continuous"] = res["served_tok_s"] / res["hf_continuous_tok_s"]
        res["served_over_hf_sequential"] = res["served_tok_s"] / res["hf_sequential_tok_s"]
    report(res, args.json, f"zeroserve bench serve (concurrency {args.concurrency})")
    return 0


def _vocab_size(model_dir: Path) -> int:
    import json

    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


if __name__ == "__main__":
    raise SystemExit(main())
