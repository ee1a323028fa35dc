"""Is a local model directory served exactly? What the engine reads of it before loading.

`check(path)` reads config.json, tokenizer_config.json and generation_config.json (no weights)
and returns a `Support`: the architecture, dtype, context length, each layer's attention
(full, or a sliding window of W tokens), logit softcaps, attention sinks, the chat template,
the EOS ids and the KV bytes one token costs; and `refusals`, the features the engine cannot
run exactly (an encoder-decoder, a vision or audio tower, a quantized checkpoint, chunked or
linear attention, bidirectional attention). The LLM engine refuses such a model at load with
those reasons (never serving it approximately); `zeroserve models check DIR` prints the whole
report. Attention keywords met only at run time are refused by attention.py in the warmup.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zeroserve.workers.engine import UnsupportedModel

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
RUNNABLE_LAYERS = ("full_attention", "sliding_attention")
TOWERS = ("vision_config", "audio_config", "vision_tower", "speech_config")


@dataclass
class Support:
    architecture: str
    model_type: str
    dtype: str
    context_length: int | None
    layers: int
    window_per_layer: list[int | None]  # None: full attention
    attn_softcap: float | None
    final_softcap: float | None
    sinks: bool
    chat_template: bool
    eos_token_ids: list[int]
    kv_bytes_per_token: int  # every layer keeping every token, in the checkpoint's dtype
    refusals: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refusals

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "supported": self.ok}


def _read(path: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads((path / name).read_text())
    except (OSError, ValueError):
        return {}


def _windows(text: dict[str, Any], layers: int) -> tuple[list[int | None], list[str]]:
    """Each layer's window as transformers' attention will be told it, and what cannot run."""
    window = text.get("sliding_window")
    types = text.get("layer_types")
    if isinstance(types, list) and types:
        odd = sorted({t for t in types if t not in RUNNABLE_LAYERS})
        refusals = [f"layer types {', '.join(odd)} (only full and sliding attention run "
                    "here)"] if odd else []
        return [window if t == "sliding_attention" else None for t in types], refusals
    if window and text.get("use_sliding_window", True):  # Mistral, Phi-3, Starcoder2, ...
        return [int(window)] * layers, []
    return [None] * layers, []


def check(path: str | Path) -> Support:
    path = Path(path)
    cfg = _read(path, "config.json")
    if not cfg:
        raise FileNotFoundError(f"{path} has no readable config.json")
    text = cfg.get("text_config") or cfg
    archs = cfg.get("architectures") or ["?"]
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or 0)
    heads = int(text.get("num_attention_heads") or text.get("n_head") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or (text.get("hidden_size") or text.get("n_embd") or 0)
                   // heads)
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or text.get("dtype") or "float32")
    windows, refusals = _windows(text, layers)
    if cfg.get("is_encoder_decoder"):
        refusals.append("an encoder-decoder model (only decoder-only LMs run here)")
    towers = [t for t in TOWERS if cfg.get(t)]
    if towers:
        refusals.append(f"a multimodal model ({', '.join(towers)}): only text LMs run here")
    quant = cfg.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        refusals.append(f"a quantized checkpoint ({method}): the engine runs unquantized "
                        "weights only")
    if text.get("attention_chunk_size"):
        refusals.append(f"chunked attention (attention_chunk_size "
                        f"{text['attention_chunk_size']})")
    if text.get("use_bidirectional_attention"):
        refusals.append("bidirectional attention (an encoder, not a causal LM)")
    gen = _read(path, "generation_config.json")
    eos = gen.get("eos_token_id", cfg.get("eos_token_id", text.get("eos_token_id")))
    eos_ids = [eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)]
    tok = _read(path, "tokenizer_config.json")
    template = bool(tok.get("chat_template")) or (path / "chat_template.jinja").exists()
    context = text.get("max_position_embeddings") or text.get("n_positions")
    return Support(
        architecture=archs[0], model_type=str(cfg.get("model_type", "?")), dtype=dtype,
        context_length=int(context) if context else None, layers=layers,
        window_per_layer=windows, attn_softcap=text.get("attn_logit_softcapping"),
        final_softcap=text.get("final_logit_softcapping"),
        sinks=text.get("model_type") == "gpt_oss", chat_template=template,
        eos_token_ids=eos_ids,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 4),
        refusals=refusals)


def require(path: str | Path) -> Support:
    """The report, or UnsupportedModel naming every reason the engine cannot run it."""
    report = check(path)
    if report.refusals:
        raise UnsupportedModel(f"{path}: not served, {'; '.join(report.refusals)}")
    return report
