"""In-process baselines for `zeroserve bench serve`: the same requests with no serving around.

  hf_sequential   one model.generate at a time
  static_batches  padded static batches of `concurrency` requests (only each request's own
                  tokens count)
  hf_continuous   transformers' continuous batching manager, created once and warmed first
  engine          zeroserve's own LLM engine driven in-process (no sockets, no threads), at
                  the same concurrency: what the pipeline adds is served / engine
Each returns output tokens per second, on the device the model is on (after the work is
done: generate returns only then). Nothing here binds or connects.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def load(model_dir: Path, dtype: str = "float32", attn: str = "sdpa",
         device: str = "cpu"):  # -> model
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     attn_implementation=attn)
    except ValueError as exc:  # a family without sdpa (Gemma 2, gpt-oss): its eager code
        if attn == "eager" or "attention implementation" not in str(exc):
            raise
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     attn_implementation="eager")
    return model.to(device).eval()


def hf_sequential(model: Any, workload: list) -> float:
    import torch

    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for _, ids, n in tqdm(workload, desc="hf sequential", leave=False):
            model.generate(torch.tensor([ids], device=model.device), max_new_tokens=n,
                           min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            tokens += n
    return tokens / (time.perf_counter() - t0)


def static_batches(model: Any, workload: list, concurrency: int) -> float:
    import torch

    tokens, t0 = 0, time.perf_counter()
    batches = [workload[i:i + concurrency] for i in range(0, len(workload), concurrency)]
    with torch.inference_mode():
        for batch in tqdm(batches, desc="static batches", leave=False):
            width = max(len(ids) for _, ids, _ in batch)
            inp = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, (_, ids, _) in enumerate(batch):  # left padding
                inp[i, width - len(ids):] = torch.tensor(ids)
                mask[i, width - len(ids):] = 1
            n = max(out for _, _, out in batch)
            model.generate(inp.to(model.device), attention_mask=mask.to(model.device),
                           max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
            tokens += sum(out for _, _, out in batch)  # only each request's own tokens count
    return tokens / (time.perf_counter() - t0)


def hf_continuous(model: Any, workload: list, concurrency: int) -> float:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=128, do_sample=False, use_cuda_graph=False)
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    try:
        # warm: one round of requests before the clock starts
        warm = [manager.add_request(ids, max_new_tokens=8)
                for _, ids, _ in workload[:concurrency]]
        _collect(manager, len(warm))
        pending = list(workload)
        tokens, t0 = 0, time.perf_counter()
        in_flight = 0
        bar = tqdm(total=len(workload), desc="hf continuous", leave=False)
        while pending or in_flight:
            while pending and in_flight < concurrency:
                _, ids, n = pending.pop(0)
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


def engine(model_dir: Path, workload: list, concurrency: int, cfg: Any) -> float:
    """zeroserve's engine in-process: `concurrency` requests in flight, stepped until done."""
    from zeroserve.workers.llm.engine import LLMEngine

    eng = LLMEngine.from_config(cfg)
    eng.warmup()
    pending = list(workload)
    in_flight, tokens, n = 0, 0, 0
    bar = tqdm(total=len(workload), desc="engine in-process", leave=False)
    t0 = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            text, _, max_tokens = pending.pop(0)
            eng.add((b"", f"e{n}"), {"prompt": text, "max_tokens": max_tokens,
                                     "temperature": 0}, [])
            in_flight, n = in_flight + 1, n + 1
        for out in eng.step():
            if out.delta:
                tokens += len(out.delta["token_ids"])
            if out.finish or out.error:
                in_flight -= 1
                bar.update()
    bar.close()
    elapsed = time.perf_counter() - t0
    eng.close()
    return tokens / elapsed
