"""Decode attention compiled over the KV blocks in place (workers/llm/paged_decode.py,
`--compile`): the kernel against the gathered attention it replaces, a compiled engine's
greedy tokens against an uncompiled one's as the batch grows and shrinks (through one
sequence), and a worker that compiles in its warmup, before READY, never while serving."""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from zeroserve import families
from zeroserve.tooling.bench.parity import greedy_tokens
from zeroserve.workers.llm import attention, paged_decode


@pytest.fixture(scope="module")
def kernel() -> paged_decode.CompiledDecode:
    return paged_decode.CompiledDecode()


@pytest.mark.parametrize("rows,window", [(1, 0), (5, 0), (3, 20)])
def test_kernel_matches_gathered_attention(kernel, rows: int, window: int) -> None:
    """float32, grouped-query heads, contexts of different lengths in scattered blocks."""
    gen = torch.Generator().manual_seed(rows)
    bs, kv_heads, heads, d, nb = 16, 2, 8, 32, 4
    k_cache = torch.randn(40, bs, kv_heads, d, generator=gen)
    v_cache = torch.randn(40, bs, kv_heads, d, generator=gen)
    q = torch.randn(rows, heads, 1, d, generator=gen)
    blocks = torch.randperm(40, generator=gen)[:rows * nb].view(rows, nb)
    lens = torch.randint(bs + 1, nb * bs + 1, (rows,), generator=gen)
    with torch.inference_mode():
        buf = torch.empty(rows * nb, bs * kv_heads * d)
        got = kernel(q, k_cache, v_cache, blocks, lens, window, d ** -0.5, buf)
        group = attention.DecodeGroup(0, rows, blocks[None], None, nb * bs, lens)
        mask = ((torch.arange(nb * bs)[None, :] < lens[:, None])[:, None, None, :]
                if not window else attention._decode_window(group, window))
        buf = torch.empty(rows * nb, bs * kv_heads * d)
        k = attention.gather(k_cache, blocks, nb * bs, buf)
        v = attention.gather(v_cache, blocks, nb * bs, buf.clone())
        want = attention.Variant(d ** -0.5).attend(q, k.contiguous(), v.contiguous(), mask)
    assert got.shape == want.shape == (rows, heads, 1, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tokenizer():
    from zeroserve.models import PRESETS, train_tokenizer

    return train_tokenizer(PRESETS["tiny"].vocab_size)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compiled_engine_generates_what_an_uncompiled_one_does(family: str, tokenizer,
                                                               tmp_path: Path) -> None:
    """float32 greedy, six sequences with different lengths and budgets: the decode batch
    goes 6, 5, ... 1 as they finish (gemma3: sliding-window and full layers)."""
    from zeroserve.config import LLMConfig, WorkerConfig
    from zeroserve.workers.llm.engine import LLMEngine

    path = families.build(family, tmp_path, tokenizer=tokenizer)
    rng = random.Random(family)
    prompts = [[rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(5, 70))]
               for _ in range(6)]
    budgets = [4, 10, 17, 25, 33, 48]
    runs = {}
    for compiled in (True, False):
        eng = LLMEngine.from_config(WorkerConfig(
            broker="-", model=str(path), device="cpu", dtype="float32",
            engine=LLMConfig(max_num_seqs=8, max_model_len=256, max_batched_tokens=64,
                             kv_cache_tokens=8 * 256, compile=compiled)))
        try:
            assert (eng.runner.decode_kernel is not None) == compiled
            runs[compiled] = greedy_tokens(eng, prompts, budgets)
        finally:
            eng.close()
    assert [len(t) for t in runs[True]] == budgets
    assert runs[True] == runs[False]


def test_worker_compiles_in_warmup_before_ready(pipeline, tiny_model: Path) -> None:
    """The compile log lines come before READY; serving compiles nothing more: batch 1, 3
    at once, and steps on a thread fewer while a megabyte is tokenized beside them."""
    pipeline.start_broker()
    pipeline.start_worker("w-compiled", "--model", str(tiny_model), "--compile",
                          "--served-name", "tiny", "--max-num-seqs", "4", engine="llm")
    pipeline.wait_workers(1, timeout_s=120)
    log = next(p for p in pipeline.logs if p.name.startswith("w-compiled"))

    def compiles() -> list[str]:
        return re.findall(r"compiled decode attention \(.*\) in [\d.]+s", log.read_text())

    text = log.read_text()
    ready = text.index("engine llm ready")
    assert compiles(), text[-3000:]
    assert text.rindex("compiled decode attention") < ready
    before = len(compiles())
    with pipeline.client() as c:
        one = c.generate("tiny", "hello there", max_tokens=12, temperature=0,
                         ignore_eos=True, timeout_s=60)
        assert len(one.token_ids) == 12
        handles = [c.submit("tiny", f"say {i}", max_tokens=20, ignore_eos=True)
                   for i in range(3)]
        assert [len(h.result(60).token_ids) for h in handles] == [20, 20, 20]
        long = c.submit("tiny", "go on", max_tokens=400, ignore_eos=True)
        arrivals: list[float] = []
        drain = threading.Thread(target=lambda: arrivals.extend(
            time.monotonic() for _ in long.chunks(60)))
        drain.start()
        while not arrivals and drain.is_alive():
            time.sleep(0.01)  # decoding: the tokenization below overlaps its steps
        said = c.submit("tiny", op="tokenize", prompt="word " * 100_000).result(60)
        tokenized = time.monotonic()
        drain.join(60)
        assert said.data["count"] > 100_000  # 500 kB of text
        assert arrivals[-1] > tokenized, "the generation ended before the tokenization"
    assert len(compiles()) == before, log.read_text()[-3000:]


def test_a_host_without_a_compiler_serves_uncompiled(pipeline, tiny_model: Path,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler and nothing cached: one error line, and the kernel runs uncompiled,
    generating what an uncompiled worker does (float32 greedy)."""
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    pipeline.start_broker()
    for name, flag in (("no-cxx", "--compile"), ("ref", "--no-compile")):
        pipeline.start_worker(name, "--model", str(tiny_model), flag, "--served-name", name,
                              "--dtype", "float32", "--max-num-seqs", "4", engine="llm")
    pipeline.wait_workers(2, timeout_s=120)
    log = next(p for p in pipeline.logs if p.name.startswith("no-cxx")).read_text()
    errors = [line for line in log.splitlines() if "could not compile" in line]
    assert len(errors) == 1 and "it runs uncompiled" in errors[0], log[-3000:]
    with pipeline.client() as c:
        said = {name: c.generate(name, "the cache is cold", max_tokens=16, temperature=0,
                                 ignore_eos=True, timeout_s=60).token_ids
                for name in ("no-cxx", "ref")}
    assert len(said["ref"]) == 16 and said["no-cxx"] == said["ref"]
