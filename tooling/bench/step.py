"""`zeroserve bench step`: one decode step of the engine against the model's forward alone.

In-process, nothing binds or connects. --batch sequences of random prompts (0.5x to 1.5x
--prompt-tokens long) are prefilled, then --steps decode steps are timed, each a whole
`engine.step()` (schedule, the packed forward through the block tables, sampling,
detokenizing, stop checks), greedy and then sampled (temperature 0.8, top-p 0.95). The same
model, loaded as transformers ships it (sdpa attention, its own KV cache), runs a decode
forward alone at the same batch, every context --prompt-tokens long (the engine's mean): the
floor.
  decode_step_ms / forward_ms    the engine's step, the forward alone (medians)
  step_over_forward              what the engine adds around the model (goal: at most 1.5)
  host_syncs_per_step            CUDA only: host waits on the device per step, the step's one
                                 deliberate wait (transfer.to_host) included (goal: 1)
  host_step_ms                   the same greedy step with the model's forward replaced by one
                                 that returns ready logits: what the engine costs the host
                                 (scheduling, inputs, sampling, detokenizing, stops)
  floor_ms, step_over_floor      what this machine cannot beat: the bytes a step must read,
                                 the weights' and its contexts' K and V (weight_gb + kv_gb),
                                 over the read bandwidth measured on 1 GiB or more
                                 (read_gb_s), or the step's matmul FLOPs (2 x weights x batch)
                                 over the matmul rate measured on this device in this dtype
                                 (matmul_tflops), whichever is larger
  compiled                       whether decode attention ran compiled (--compile/--no-compile;
                                 default: the worker's for the device)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from zeroserve.tooling.bench import model_parser
from zeroserve.tooling.bench.stats import report


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_steps(cfg: Any, batch: int, prompt: int, steps: int, body: dict[str, Any]
                 ) -> tuple[list[float], float | None, list[float], int]:
    """Per-step wall times (ms) of `steps` decode steps at `batch`; on CUDA the host
    synchronisations per step (counted by torch's profiler over five more steps); then the
    step times again with the model's forward replaced by ready logits (the host's share);
    and the K and V bytes a timed step reads (its contexts midway)."""
    from zeroserve.workers.llm.engine import LLMEngine
    from zeroserve.workers.llm.kv_cache import KVCache

    eng = LLMEngine.from_config(cfg)
    eng.warmup()
    rng = random.Random(0)
    vocab = eng.runner.vocab_size
    for i in range(batch):  # contexts of mixed lengths, as served requests have
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(prompt // 2, prompt * 3 // 2))]
        # tokens to spare for the warm-up, the timed pass and the host-share pass, and for
        # the steps a sequence decodes while the batch's longer prompts still prefill
        eng.add((b"", f"s{i}"), {**body, "prompt_token_ids": ids,
                                 "max_tokens": cfg.engine.max_model_len - len(ids),
                                 "ignore_eos": True}, [])
    while any(s.num_computed < s.total_len - 1 for s in eng.seqs.values()):
        eng.step()  # prefill
    for _ in range(3):
        eng.step()  # warm the decode shapes

    context = sum(s.num_computed for s in eng.seqs.values()) + batch * steps // 2
    k = eng.runner.kv.k[0]  # [blocks, block_size, kv_heads, head_dim]
    kv_bytes = context * KVCache.bytes_per_token(len(eng.runner.kv.k), k.shape[2], k.shape[3],
                                                 k.dtype)

    def timed() -> list[float]:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            outs = eng.step()
            times.append((time.perf_counter() - t0) * 1000)
            assert len(outs) == batch, "every sequence decodes one token a step"
        return times

    try:
        times = timed()
        syncs = host_syncs(eng, 5) if torch.device(cfg.device).type == "cuda" else None
        eng.runner.model = ReadyLogits(eng.runner.model, vocab, batch)
        host = timed()
    finally:
        eng.close()
    return times, syncs, host, kv_bytes


class ReadyLogits:
    """Stands in for a model: logits of the right shape at once, no forward computed."""

    def __init__(self, model: Any, vocab: int, rows: int) -> None:
        p = next(model.parameters())
        self.logits = torch.zeros(1, rows, vocab, dtype=p.dtype, device=p.device)

    def __call__(self, logits_to_keep: torch.Tensor, **_: Any) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits[:, :logits_to_keep.shape[0]])


def host_syncs(eng: Any, steps: int) -> float:
    """Host waits on the device per engine step: every cuda*Synchronize the runtime saw (a
    pageable copy, an .item() or a .tolist() each make one too), less those the profiler
    makes itself (counted over a profile of no step)."""
    from torch.profiler import ProfilerActivity, profile

    def syncs(n: int) -> int:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                eng.step()
        return sum(e.count for e in prof.key_averages() if "Synchronize" in e.key)

    return (syncs(steps) - syncs(0)) / steps


def forward_alone(model: Any, device: torch.device, batch: int, prompt: int,
                  steps: int) -> list[float]:
    """Per-step times (ms) of the model's own decode forward at `batch`, with its KV cache."""
    from transformers import DynamicCache

    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), device=device)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(steps + 3):
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            _sync(device)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1000)
    return times


def floor(model: Any, device: torch.device, batch: int, kv_bytes: int) -> dict[str, float]:
    """The decode step's floor on this machine (see the module docstring), measured."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    nbytes = sum(p.numel() * p.element_size() for p in weights) + kv_bytes
    flops = 2 * batch * sum(p.numel() for p in weights)

    def best_s(work: Any, repeat: int = 5) -> float:
        work()  # warm
        times = []
        for _ in range(repeat):
            _sync(device)
            t0 = time.perf_counter()
            work()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.inference_mode():
        # a buffer past every cache (1 GiB, or the weights' size if larger): DRAM or HBM;
        # float32, whose sum keeps up with memory (a bfloat16 sum is compute-bound on CPU)
        big = torch.ones(max(1 << 30, nbytes) // 4, device=device, dtype=torch.float32)
        read_s = best_s(big.sum) * nbytes / (big.numel() * 4)
        del big
        n = 2048 if device.type == "cpu" else 8192  # large enough to be compute-bound
        a = torch.randn(n, n, device=device, dtype=weights[0].dtype)
        rate = 2 * n ** 3 * 4 / best_s(lambda: [a @ a for _ in range(4)])
    floor_s = max(read_s, flops / rate)
    return {"read_gb_s": nbytes / read_s / 1e9, "matmul_tflops": rate / 1e12,
            "weight_gb": (nbytes - kv_bytes) / 1e9, "kv_gb": kv_bytes / 1e9,
            "floor_ms": floor_s * 1000}


def run(model: str, device: str, dtype: str, batch: int, prompt: int,
        steps: int, compile_decode: bool | None = None) -> dict[str, Any]:
    from zeroserve.config import LLMConfig, WorkerConfig
    from zeroserve.models import resolve
    from zeroserve.tooling.bench import baselines
    from zeroserve.workers.llm.model_runner import pick_dtype

    path = resolve(model)
    dev = torch.device(device)
    dt = pick_dtype(dtype, dev)[0]
    cfg = WorkerConfig(broker="-", model=str(path), device=device,
                       dtype=str(dt).removeprefix("torch."),
                       engine=LLMConfig(max_num_seqs=batch,
                                        max_model_len=2 * prompt + 2 * steps + 64,
                                        kv_cache_tokens=batch * (2 * prompt + 2 * steps + 64),
                                        compile=compile_decode))
    res: dict[str, Any] = {"device": device, "dtype": cfg.dtype, "batch": batch,
                           "compiled": cfg.engine.compiles(dev.type),
                           "prompt_tokens": prompt, "steps": steps}
    greedy, syncs, host, kv_bytes = engine_steps(cfg, batch, prompt, steps, {"temperature": 0})
    sampled, syncs_sampled, _, _ = engine_steps(cfg, batch, prompt, steps,
                                                {"temperature": 0.8, "top_p": 0.95, "seed": 1})
    ref = baselines.load(path, cfg.dtype).to(dev)
    alone = forward_alone(ref, dev, batch, prompt, steps)
    res["decode_step_ms"] = statistics.median(greedy)
    res["decode_step_sampled_ms"] = statistics.median(sampled)
    res["forward_ms"] = statistics.median(alone)
    res["host_step_ms"] = statistics.median(host)
    res["step_over_forward"] = res["decode_step_ms"] / res["forward_ms"]
    res.update(floor(ref, dev, batch, kv_bytes))
    res["step_over_floor"] = res["decode_step_ms"] / res["floor_ms"]
    res["sampled_step_over_forward"] = res["decode_step_sampled_ms"] / res["forward_ms"]
    if syncs is not None and syncs_sampled is not None:
        res["host_syncs_per_step"] = max(syncs, syncs_sampled)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("step", __doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="the worker's --compile (default: its default for the device)")
    args = ap.parse_args(argv)
    res = run(args.model, args.device, args.dtype, args.batch, args.prompt_tokens, args.steps,
              args.compile)
    report(res, args.json, f"zeroserve bench step (batch {args.batch}, {args.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
