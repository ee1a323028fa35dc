"""Linear weights packed for oneDNN (workers/llm/prepack.py): in bfloat16 on CPU a packed engine
generates exactly what an unpacked one does, across families (dense, MoE, fused projections,
windowed, tied heads), through chunked prefill and a cached prefix; float32 is never packed,
and a tied LM head is left alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch import nn

from zeroserve import families
from zeroserve.tooling.bench.parity import greedy_tokens
from zeroserve.workers.llm import prepack

FAMILIES = ["llama", "qwen2-moe", "phi3", "gpt-neox", "gemma", "gemma3", "gpt-oss"]
pytestmark = pytest.mark.skipif(not prepack.available(torch.device("cpu"), torch.bfloat16),
                                reason="this torch has no oneDNN weight packing")


@pytest.fixture(scope="module")
def tokenizer():
    from zeroserve.models import PRESETS, train_tokenizer

    return train_tokenizer(PRESETS["tiny"].vocab_size)


def _engine(path: Path, dtype: str, packed: bool):
    from zeroserve.config import LLMConfig, WorkerConfig
    from zeroserve.workers.llm.engine import LLMEngine

    return LLMEngine.from_config(WorkerConfig(
        broker="-", model=str(path), device="cpu", dtype=dtype,
        engine=LLMConfig(max_num_seqs=8, max_model_len=512, max_batched_tokens=48,
                         kv_cache_tokens=8 * 512, prepack=packed)))


def _packed_modules(eng) -> int:
    return sum(isinstance(m, prepack.PackedLinear) for m in eng.runner.model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_packed_engine_generates_what_an_unpacked_one_does(family: str, tokenizer,
                                                             tmp_path: Path) -> None:
    path = families.build(family, tmp_path, tokenizer=tokenizer)
    rng = random.Random(family)
    vocab = len(tokenizer)
    first = [[rng.randrange(3, vocab) for _ in range(rng.randint(64, 120))] for _ in range(4)]
    second = [first[i][:64] + [rng.randrange(3, vocab) for _ in range(20)] for i in range(2)]
    runs = {}
    for packed in (True, False):
        eng = _engine(path, "bfloat16", packed)
        try:
            assert (_packed_modules(eng) > 0) == packed
            runs[packed] = greedy_tokens(eng, first, 24) + greedy_tokens(eng, second, 24)
        finally:
            eng.close()
    assert runs[True] == runs[False]


def test_float32_is_never_packed(tokenizer, tmp_path: Path) -> None:
    eng = _engine(families.build("llama", tmp_path, tokenizer=tokenizer), "float32", True)
    try:
        assert _packed_modules(eng) == 0
    finally:
        eng.close()


def test_a_tied_head_is_left_alone_and_the_rest_gives_the_same_logits() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.inference_mode():
        want = model(input_ids=ids).logits
        linears = sum(type(m) is nn.Linear for m in model.modules())
        assert prepack.prepack(model) == linears - 1  # all but the tied head
        got = model(input_ids=ids).logits
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(got, want)
