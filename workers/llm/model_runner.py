"""Loads a Hugging Face causal LM from a local directory and runs packed batches on it.

The model keeps transformers' own code; only attention is ours (attention.py), reading and
writing the KV cache this runner owns. One forward per engine step: decode tokens first, then
prefill chunks, all in one [1, N] row; logits are computed only at the rows that sample.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import torch
from zeroserve.workers.llm import attention
from zeroserve.workers.llm.kv_cache import KVCache
from zeroserve.workers.llm.scheduler import Plan

log = logging.getLogger("zeroserve.worker")

KV_MEMORY_FRACTION = 0.3  # of available host memory (CPU) or free device memory (CUDA)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}: pick one of auto, {', '.join(dtypes)}")
    return dtypes[name]


def load(path: Path, device: torch.device, dtype: torch.dtype):  # -> (model, tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = attention.register()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype=dtype, attn_implementation=name)
    return model.to(device).eval(), tokenizer


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, max_model_len: int,
                 max_num_seqs: int, kv_cache_tokens: int) -> None:
        self.model = model
        self.device = device
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.vocab_size = text_cfg.vocab_size
        layers = text_cfg.num_hidden_layers
        heads = text_cfg.num_attention_heads
        kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
        limit = getattr(text_cfg, "max_position_embeddings", max_model_len) or max_model_len
        self.max_model_len = min(max_model_len, limit)
        dtype = next(model.parameters()).dtype
        per_token = KVCache.bytes_per_token(layers, kv_heads, head_dim, dtype)
        if kv_cache_tokens <= 0:
            kv_cache_tokens = int(_free_memory(device) * KV_MEMORY_FRACTION) // per_token
        slots = min(max_num_seqs, kv_cache_tokens // self.max_model_len)
        if slots < 1:
            raise ValueError(f"KV cache of {kv_cache_tokens} tokens holds no sequence of "
                             f"{self.max_model_len}: lower --max-model-len or raise the cache")
        self.kv = KVCache(layers, slots, kv_heads, self.max_model_len, head_dim, dtype, device)
        log.info("KV cache: %d slots x %d tokens (%.1f MiB, %s)", slots, self.max_model_len,
                 slots * self.max_model_len * per_token / 2**20, dtype)

    @torch.inference_mode()
    def forward(self, plan: Plan) -> torch.Tensor:
        """Run one step; [K, V] logits for decodes and for prefills that end their prompt."""
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        for seq in plan.decodes:
            ids.append(seq.next_input())
            pos.append(seq.total_len - 1)
            slots.append(seq.slot)
            keep.append(len(ids) - 1)
        nd = len(ids)
        prefills = []
        for seq, n in plan.prefills:
            a, start = len(ids), seq.num_computed
            ids.extend(seq.prompt_ids[start:start + n])
            pos.extend(range(start, start + n))
            slots.extend([seq.slot] * n)
            prefills.append((a, a + n, seq.slot, start))
            if start + n >= seq.prompt_len:
                keep.append(a + n - 1)
        dev = self.device
        ctx = attention.ForwardContext(
            self.kv.k, self.kv.v,
            slot_of_token=torch.tensor(slots, device=dev),
            pos_of_token=torch.tensor(pos, device=dev),
            prefills=prefills,
        )
        if nd:
            dec_slots = slots[:nd]
            hi = max(dec_slots) + 1
            lens = [1] * hi  # unused slots in the range attend to one harmless position
            for seq in plan.decodes:
                lens[seq.slot] = seq.total_len
            length = max(lens)
            lens_t = torch.tensor(lens, device=dev)
            ctx.num_decode = nd
            ctx.decode_hi, ctx.decode_len = hi, length
            ctx.decode_dense = dec_slots == list(range(nd))
            ctx.decode_slots = torch.tensor(dec_slots, device=dev)
            mask = torch.arange(length, device=dev)[None, :] < lens_t[:, None]  # [hi, L]
            ctx.decode_mask = mask[:, None, None, :]
        attention.set_context(ctx)
        try:
            out = self.model(
                input_ids=torch.tensor([ids], device=dev),
                position_ids=torch.tensor([pos], device=dev),
                use_cache=False,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev),
            )
        finally:
            attention.set_context(None)
        return out.logits[0]  # [K, V]


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available
