"""`zeroserve bench parity`: greedy tokens of the engine against transformers' generate.

In-process, nothing binds or connects. --prompts random prompts of 3 to 200 tokens run through
the engine together (continuous batching, chunked prefill, block tables), greedy, --max-tokens
each; the same model as transformers ships it (sdpa attention) generates each alone, in the
same dtype on the same device. Where the two differ, the first differing step is judged by
HF's own top-2 logit gap there: below --tie-gap (default: 1e-3 in float32, 0.125 in 16-bit
types, whose logits are that coarse) the two picks are a near tie that rounding decides;
above, it is a divergence, a bug.
  exact             prompts with identical outputs
  near_ties         prompts that part at a near tie
  divergences       prompts that part anywhere else (goal: 0)
  tokens_matched    fraction of output tokens equal before the first difference
"""

from __future__ import annotations

import random
from typing import Any

import torch

from zeroserve.tooling.bench import model_parser
from zeroserve.tooling.bench.stats import report


def greedy_tokens(eng: Any, prompts: list[list[int]],
                  max_tokens: int | list[int]) -> list[list[int]]:
    """Each prompt's greedy tokens from an in-process LLM engine, all added at once and
    stepped until idle (`max_tokens` one for all, or one a prompt); a request that fails
    raises."""
    out: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    for i, (ids, n) in enumerate(zip(prompts, limits, strict=True)):
        eng.add((b"", f"p{i}"), {"prompt_token_ids": ids, "max_tokens": n,
                                 "temperature": 0, "ignore_eos": True}, [])
    while eng.has_work():
        for o in eng.step():
            if o.error:
                raise RuntimeError(f"{o.key[1]}: {o.error}")
            if o.delta:
                out[o.key[1]] += o.delta["token_ids"]
    return [out[f"p{i}"] for i in range(len(prompts))]


def engine_outputs(cfg: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from zeroserve.workers.llm.engine import LLMEngine

    eng = LLMEngine.from_config(cfg)
    eng.warmup()
    try:
        return greedy_tokens(eng, prompts, max_tokens)
    finally:
        eng.close()


def hf_greedy(model: Any, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=dev),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=dev),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), torch.stack(out.scores)[:, 0].float().cpu()


def run(model: str, device: str, dtype: str, prompts: int, max_tokens: int,
        tie_gap: float | None) -> dict[str, Any]:
    from zeroserve.config import LLMConfig, WorkerConfig
    from zeroserve.models import resolve
    from zeroserve.tooling.bench import baselines
    from zeroserve.workers.llm.model_runner import pick_dtype

    path = resolve(model)
    dt = pick_dtype(dtype, torch.device(device))[0]
    name = str(dt).removeprefix("torch.")
    gap_limit = tie_gap if tie_gap is not None else (1e-3 if dt == torch.float32 else 0.125)
    cfg = WorkerConfig(broker="-", model=str(path), device=device, dtype=name,
                       engine=LLMConfig(max_num_seqs=prompts, max_model_len=256 + max_tokens,
                                        max_batched_tokens=256,
                                        kv_cache_tokens=prompts * (256 + max_tokens)))
    rng = random.Random(7)
    ref = baselines.load(path, name).to(device)
    vocab = ref.config.vocab_size
    batch = [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 200))]
             for _ in range(prompts)]
    ours = engine_outputs(cfg, batch, max_tokens)
    exact = ties = diverged = matched = 0
    worst = 0.0
    for ids, got in zip(batch, ours, strict=True):
        want, scores = hf_greedy(ref, ids, max_tokens)
        if got == want:
            exact += 1
            matched += len(want)
            continue
        step = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                    min(len(got), len(want)))
        matched += step
        top2 = torch.topk(scores[min(step, len(scores) - 1)], 2).values
        gap = float(top2[0] - top2[1])
        if gap < gap_limit:
            ties += 1
        else:
            diverged += 1
            worst = max(worst, gap)
    return {"device": device, "dtype": name, "prompts": prompts, "max_tokens": max_tokens,
            "tie_gap": gap_limit, "exact": exact, "near_ties": ties, "divergences": diverged,
            "worst_divergence_gap": worst, "tokens_matched": matched / (prompts * max_tokens)}


def main(argv: list[str] | None = None) -> int:
    ap = model_parser("parity", __doc__)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tie-gap", type=float, default=None)
    args = ap.parse_args(argv)
    res = run(args.model, args.device, args.dtype, args.prompts, args.max_tokens, args.tie_gap)
    report(res, args.json, f"zeroserve bench parity ({args.device}, {res['dtype']})")
    return 0 if res["divergences"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
