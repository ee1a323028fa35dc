"""Random tiny models of many transformers families, for parity checks and benchmarks.

`build(family, out)` writes a model directory like a real checkpoint's (config, safetensors,
the tiny preset's tokenizer and chat template) with random weights: 2 layers, hidden 64,
4 heads (2 KV heads) of 16. Windowed families get a small window (default 32), so prompts of
a hundred tokens already cross it; `zeroserve make-model --family NAME [--window W]` builds one
for `zeroserve bench parity` or `bench serve`. Outputs are gibberish; what they test is that
the engine computes exactly what transformers computes for that family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

WINDOW = 32  # tokens a windowed layer sees: small, so short prompts already cross it

# family -> (model_type, config overrides). "W" stands for the window.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen2-moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 64}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma": ("gemma", {}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "starcoder2": ("starcoder2", {}),
    "gpt-neox": ("gpt_neox", {"num_key_value_heads": None, "head_dim": None}),  # no GQA
    "gpt2": ("gpt2", {"num_key_value_heads": None, "head_dim": None}),
    # windowed, softcapped, with sinks
    "mistral": ("mistral", {"sliding_window": "W"}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": "W",
                               "max_window_layers": 1}),  # layer 1 windowed, layer 0 full
    "gemma2": ("gemma2", {"sliding_window": "W", "attn_logit_softcapping": 50.0,
                          "final_logit_softcapping": 30.0}),
    "gemma3": ("gemma3_text", {"sliding_window": "W",
                               "layer_types": ["sliding_attention", "full_attention"]}),
    "cohere2": ("cohere2", {"sliding_window": "W",
                            "layer_types": ["sliding_attention", "full_attention"]}),
    "gpt-oss": ("gpt_oss", {"sliding_window": "W", "num_local_experts": 4,
                            "num_experts_per_tok": 2,
                            "layer_types": ["sliding_attention", "full_attention"]}),
}
WINDOWED = ("mistral", "qwen2-window", "gemma2", "gemma3", "cohere2", "gpt-oss")


def config(family: str, vocab_size: int, special: dict[str, int], window: int = WINDOW,
           max_position: int = 8192) -> Any:
    from transformers import AutoConfig

    model_type, extra = FAMILIES[family]
    fields = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "max_position_embeddings": max_position,
              "tie_word_embeddings": False, "dtype": "float32", **special,
              **{k: window if v == "W" else v for k, v in extra.items()}}
    return AutoConfig.for_model(model_type, **{k: v for k, v in fields.items()
                                               if v is not None})


def build(family: str, out: Path, window: int = WINDOW, tokenizer: Any = None) -> Path:
    """A random tiny `family` model in directory `out`, with the tiny preset's tokenizer
    (trained here unless one is given)."""
    import torch
    from transformers import AutoModelForCausalLM

    from zeroserve.models import PRESETS, train_tokenizer

    tokenizer = tokenizer or train_tokenizer(PRESETS["tiny"].vocab_size)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    cfg = config(family, len(tokenizer), special, window)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # wider than the default init, so greedy outputs follow the prompt
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 1.0 / param.shape[1] ** 0.5)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
