"""Exact or refused: what workers/llm/support.py reads of a model directory, the refusals it
names, `zeroserve models check`, and a worker that refuses such a model at load."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zeroserve import families
from zeroserve.workers.engine import UnsupportedModel
from zeroserve.workers.llm import attention, support


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    from zeroserve.models import PRESETS, train_tokenizer

    tok = train_tokenizer(PRESETS["tiny"].vocab_size)
    return {f: families.build(f, tmp_path_factory.mktemp(f), tokenizer=tok)
            for f in ("llama", "mistral", "gemma2", "gemma3", "gpt-oss")}


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_the_report_names_windows_softcaps_sinks_and_kv_bytes(built) -> None:
    llama, mistral = support.check(built["llama"]), support.check(built["mistral"])
    assert llama.ok and llama.window_per_layer == [None, None] and llama.chat_template
    assert mistral.window_per_layer == [32, 32]
    assert support.check(built["gemma3"]).window_per_layer == [32, None]
    gemma2 = support.check(built["gemma2"])
    assert gemma2.attn_softcap == 50.0 and gemma2.final_softcap == 30.0
    assert support.check(built["gpt-oss"]).sinks
    assert llama.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K+V, layers, kv heads, dim, fp32
    assert llama.eos_token_ids == [1]


@pytest.mark.parametrize("changes, reason", [
    ({"is_encoder_decoder": True}, "encoder-decoder"),
    ({"vision_config": {"hidden_size": 8}}, "multimodal"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"quantized checkpoint \(gptq\)"),
    ({"layer_types": ["full_attention", "linear_attention"]}, "linear_attention"),
    ({"attention_chunk_size": 8192}, "chunked attention"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
])
def test_what_cannot_run_exactly_is_refused_by_name(built, tmp_path, changes, reason) -> None:
    path = _with_config(built["llama"], tmp_path / "m", **changes)
    with pytest.raises(UnsupportedModel, match=reason):
        support.require(path)


def test_an_attention_keyword_the_engine_does_not_know_is_refused() -> None:
    class Layer(torch.nn.Module):
        layer_idx = 0

    q = torch.zeros(1, 4, 2, 16)
    attention.set_context(attention.ForwardContext([], [], [0], torch.zeros(1, 0), q, q))
    try:
        with pytest.raises(UnsupportedModel, match="Layer passes attention_bias"):
            attention.block_attention(Layer(), q, q, q, None, attention_bias=torch.ones(1))
    finally:
        attention.set_context(None)


def test_models_check_cli(built, tmp_path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "zeroserve.tooling.cli", "models",
                               "check", *args], capture_output=True, text=True, timeout=60)

    ok = run(str(built["gemma3"]))
    assert ok.returncode == 0 and "window 32, full" in ok.stdout, ok.stdout + ok.stderr
    bad = _with_config(built["llama"], tmp_path / "q",
                       quantization_config={"quant_method": "awq"})
    refused = run(str(bad), "--json")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["refusals"] == [
        "a quantized checkpoint (awq): the engine runs unquantized weights only"]
    assert run(str(tmp_path / "nothing")).returncode == 2


def test_a_worker_refuses_an_unsupported_model_at_load(pipeline, built, tmp_path) -> None:
    path = _with_config(built["llama"], tmp_path / "enc", is_encoder_decoder=True)
    pipeline.start_broker()
    proc = pipeline.start_worker("w", "--model", str(path), engine="llm")
    assert proc.wait(60) == 3
    assert "refusing to serve" in pipeline.dump_logs() and "encoder-decoder" in (
        pipeline.dump_logs())
