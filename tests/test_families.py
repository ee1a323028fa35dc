"""The parity matrix: random tiny models of every family in families.py, served by the engine
exactly as transformers computes them (float32, greedy), with prompts longer than the sliding
window, chunked prefill, a batch of several sequences and a cached prefix."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from zeroserve import families
from zeroserve.tooling.bench.parity import greedy_tokens, hf_greedy

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer():
    from zeroserve.models import PRESETS, train_tokenizer

    return train_tokenizer(PRESETS["tiny"].vocab_size)


def _engine(path: Path):
    from zeroserve.config import LLMConfig, WorkerConfig
    from zeroserve.workers.llm.engine import LLMEngine

    cfg = WorkerConfig(broker="-", model=str(path), device="cpu", dtype="float32",
                       engine=LLMConfig(max_num_seqs=8, max_model_len=512,
                                        max_batched_tokens=48, kv_cache_tokens=8 * 512,
                                        check_blocks=True))
    return LLMEngine.from_config(cfg)


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_engine_matches_transformers(family: str, tokenizer, tmp_path: Path) -> None:
    from zeroserve.tooling.bench.baselines import load

    path = families.build(family, tmp_path, tokenizer=tokenizer)
    ref = load(path)
    rng = random.Random(family)
    vocab = ref.config.vocab_size
    # 64-120 tokens: past the 32-token window; 48 tokens a step: every prompt is chunked
    first = [[rng.randrange(3, vocab) for _ in range(rng.randint(64, 120))] for _ in range(4)]
    # then prompts that share first's first 64 tokens: prefill over a cached prefix
    second = [first[i][:64] + [rng.randrange(3, vocab) for _ in range(20)] for i in range(2)]
    eng = _engine(path)
    try:
        eng.warmup()
        got = greedy_tokens(eng, first, MAX_TOKENS)
        hits = eng.blocks.hit_tokens
        got += greedy_tokens(eng, second, MAX_TOKENS)
        assert eng.blocks.hit_tokens - hits >= 2 * 48, "the second round reused no prefix"
        if family in families.WINDOWED:
            assert families.WINDOW in eng.runner.layer_windows, eng.runner.layer_windows
    finally:
        eng.close()
    for ids, tokens in zip(first + second, got, strict=True):
        want, _ = hf_greedy(ref, ids, MAX_TOKENS)
        assert tokens == want, f"{family}: prompt of {len(ids)} tokens diverged"


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_windowed_layers_hold_only_their_window(family: str, tokenizer, tmp_path: Path) -> None:
    """A long generation on a windowed model: its windowed layers hold at most window / block
    + 2 blocks while decoding (full layers hold every token), and the tokens stay exact."""
    from zeroserve.tooling.bench.baselines import load

    path = families.build(family, tmp_path, tokenizer=tokenizer)
    eng = _engine(path)
    bs = eng.blocks.block_size
    bound = families.WINDOW // bs + 2
    ids = [random.Random(family).randrange(3, 500) for _ in range(150)]
    eng.add((b"", "long"), {"prompt_token_ids": ids, "max_tokens": 250, "temperature": 0,
                            "ignore_eos": True}, [])
    got: list[int] = []
    try:
        while eng.has_work():
            for o in eng.step():
                assert o.error is None, o.error
                got += o.delta["token_ids"] if o.delta else []
            groups = eng.stats()["kv_groups"]
            held = {g["window"]: g["used"] for g in groups}
            if eng.scheduler.running and len(got) > 1:  # decoding
                assert held[families.WINDOW] <= bound, held
                if None in held:  # full layers keep every computed token
                    assert held[None] == -(-(len(ids) + len(got) - 1) // bs), held
        windowed = next(g for g in groups if g["window"] == families.WINDOW)
        assert windowed["max_decode_held"] <= bound
        assert windowed["max_held"] <= -(-(families.WINDOW - 1 + 48) // bs) + 1  # a prefill
        stats = eng.stats()
        assert stats["kv_tokens_used_peak"] < stats["kv_tokens_full_attention_peak"]
        assert windowed["used"] == 0  # all given back at the end
    finally:
        eng.close()
    want, _ = hf_greedy(load(path), ids, 250)
    assert got == want


@pytest.mark.parametrize("family", ["gemma3", "qwen2-window"])
def test_windowed_models_survive_preemption_exactly(family: str, tokenizer,
                                                    tmp_path: Path) -> None:
    """KV too small for the batch (local and global layers): sequences are preempted and
    recompute, windowed groups included, and every output is still transformers' own. (An
    all-windowed model such as Mistral holds a bounded number of blocks per sequence, so
    admission, not preemption, is what limits it.)"""
    from zeroserve.config import LLMConfig, WorkerConfig
    from zeroserve.tooling.bench.baselines import load
    from zeroserve.workers.llm.engine import LLMEngine

    path = families.build(family, tmp_path, tokenizer=tokenizer)
    eng = LLMEngine.from_config(WorkerConfig(
        broker="-", model=str(path), device="cpu", dtype="float32",
        engine=LLMConfig(max_num_seqs=4, max_model_len=512, max_batched_tokens=48,
                         kv_cache_tokens=10 * 16, block_size=16, check_blocks=True)))
    rng = random.Random(family)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(40, 90))] for _ in range(4)]
    try:
        got = greedy_tokens(eng, prompts, MAX_TOKENS)
        assert eng.stats()["preemptions"] > 0, "the batch fitted: nothing was preempted"
    finally:
        eng.close()
    ref = load(path)
    for ids, tokens in zip(prompts, got, strict=True):
        assert tokens == hf_greedy(ref, ids, MAX_TOKENS)[0]
