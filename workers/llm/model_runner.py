"""Loads a Hugging Face causal LM from a local directory and runs packed batches on it.

The model keeps transformers' own code; only attention is ours (attention.py), reading and
writing the KV blocks this runner owns. One forward per engine step: single-token rows first
(sorted by context length, grouped), then prompt chunks, all in one [1, N] row; logits are
computed only at the rows that end a sequence's pending tokens (the ones that sample).
"""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import torch

from zeroserve.workers.engine import UnsupportedModel
from zeroserve.workers.llm import attention, paged_decode
from zeroserve.workers.llm.kv_cache import Group, KVCache, plan_groups
from zeroserve.workers.llm.scheduler import Plan
from zeroserve.workers.llm.sequence import Sequence
from zeroserve.workers.llm.transfer import to_device

log = logging.getLogger("zeroserve.worker")

KV_MEMORY_FRACTION = 0.3  # of available host memory (CPU) or free device memory (CUDA)
# A decode group is split where padding its shorter contexts would cost more than this many
# blocks of gathered K/V: roughly what one more SDPA call per layer costs. On CUDA a call's
# launches cost far more than copying padding at memory bandwidth.
GROUP_SPLIT_BLOCKS = {"cpu": 16, "cuda": 2048}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def pick_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype and why: --dtype auto takes bfloat16 where the hardware runs it
    natively (CUDA; CPUs with AVX512-BF16 or AMX), float32 elsewhere."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name != "auto":
        if name not in dtypes:
            raise ValueError(f"unknown dtype {name!r}: pick one of auto, {', '.join(dtypes)}")
        return dtypes[name], "asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: CUDA device with bfloat16"
        return torch.float16, "auto: CUDA device without bfloat16"
    flags = _cpu_flags()
    native = [f for f in CPU_BF16_FLAGS if f in flags]
    if native:
        return torch.bfloat16, f"auto: CPU has native bfloat16 ({', '.join(native)})"
    return torch.float32, "auto: CPU without native bfloat16 (no avx512_bf16 or amx_bf16)"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load(path: Path, device: torch.device, dtype: torch.dtype):  # -> (model, tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = attention.register()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation=name)
    except ValueError as exc:  # e.g. a family whose attention is not pluggable (ALiBi ones)
        if "attention" not in str(exc):
            raise
        raise UnsupportedModel(f"{path}: its attention cannot be replaced by the engine's "
                               f"paged attention ({exc})") from None
    return model.to(device).eval(), tokenizer


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, max_model_len: int,
                 max_num_seqs: int, kv_cache_tokens: int, block_size: int,
                 chunk: int = 0, compile_decode: bool = False) -> None:
        """`chunk`: the most tokens a step computes (sizes the windowed KV groups);
        `compile_decode`: decode attention through paged_decode's compiled kernel."""
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
        self.block_size = block_size
        dtype = next(model.parameters()).dtype
        per_token = KVCache.bytes_per_token(layers, kv_heads, head_dim, dtype)
        if kv_cache_tokens <= 0:  # from free memory, but never past every seat at full length
            kv_cache_tokens = min(int(_free_memory(device) * KV_MEMORY_FRACTION) // per_token,
                                  max_num_seqs * self.max_model_len)
        num_blocks = kv_cache_tokens // block_size
        if num_blocks < 1:
            raise ValueError(f"a KV cache of {kv_cache_tokens} tokens holds no block of "
                             f"{block_size}: raise --kv-cache-tokens")
        # each layer's sliding window as its attention asks for it (None: full attention)
        self.layer_windows = self._probe_windows(layers, block_size, kv_heads, head_dim, dtype)
        self.windowed = any(w is not None for w in self.layer_windows)
        groups = plan_groups(self.layer_windows, num_blocks, block_size, max_num_seqs,
                             chunk or block_size)
        self.kv = KVCache(groups, block_size, kv_heads, head_dim, dtype, device)
        self._bufs = (torch.empty(0), torch.empty(0))  # gather workspaces, grown on demand
        self.decode_kernel = paged_decode.CompiledDecode() if compile_decode else None
        self.split_blocks = GROUP_SPLIT_BLOCKS.get(device.type, GROUP_SPLIT_BLOCKS["cpu"])
        # first chunks of several sequences in one attention call (attention.PackedPrefills)
        self.pack_prefills = device.type == "cuda"
        layer_bytes = per_token // layers * block_size
        for g in groups:
            log.info("KV cache%s: %d blocks x %d tokens in %d layers (%.1f MiB, %s)",
                     f" (sliding window {g.window})" if g.window else "", g.num_blocks,
                     block_size, len(g.layers),
                     g.num_blocks * len(g.layers) * layer_bytes / 2**20, dtype)

    @torch.inference_mode()
    def forward(self, plan: Plan) -> tuple[torch.Tensor, list[Sequence]]:
        """Run one step: [K, V] logits and the K sequences they belong to, in that order."""
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        pos: list[int] = []
        slots: list[list[int]] = [[] for _ in self.kv.groups]  # per KV group
        keep: list[int] = []
        sampled: list[Sequence] = []

        def place(seq: Sequence, n: int) -> int:
            a, start = len(ids), seq.num_computed
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            for out, hold in zip(slots, seq.kv, strict=True):
                table = hold.table
                out.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if start + n == seq.total_len:
                keep.append(a + n - 1)
                sampled.append(seq)
            return a

        singles = sorted((s for s, n in plan.chunks if n == 1), key=lambda s: s.num_computed)
        for seq in singles:
            place(seq, 1)
        decodes = [self._decode_group(group, a)
                   for group, a in _groups(singles, bs, self.split_blocks)]
        packed = None
        fresh = [(s, n) for s, n in plan.chunks if n > 1 and s.num_computed == 0]
        if self.pack_prefills and len(fresh) > 1:
            a = len(ids)
            segment: list[int] = []  # which chunk each row belongs to
            for i, (seq, n) in enumerate(fresh):
                place(seq, n)
                segment += [i] * n
            packed = attention.PackedPrefills(a, len(ids), self._packed_mask(segment))
        prefills = [self._prefill_chunk(seq, n, place(seq, n)) for seq, n in plan.chunks
                    if n > 1 and (packed is None or seq.num_computed > 0)]
        rows = max([g.blocks[0].numel() for g in decodes]
                   + [c.blocks[0].numel() for c in prefills if c.blocks is not None] + [0])
        k_buf, v_buf = self._workspaces(rows)
        ctx = attention.ForwardContext(self.kv.k, self.kv.v, self.kv.group_of,
                                       to_device(slots, torch.long, dev), k_buf, v_buf,
                                       decodes, prefills, packed,
                                       decode_kernel=self.decode_kernel)
        attention.set_context(ctx)
        try:
            out = self.model(
                input_ids=to_device([ids], torch.long, dev),
                position_ids=to_device([pos], torch.long, dev),
                use_cache=False,
                logits_to_keep=to_device(keep, torch.long, dev),
            )
        finally:
            attention.set_context(None)
        return out.logits[0], sampled  # [K, V]

    def _prefill_chunk(self, seq: Sequence, n: int, a: int) -> attention.PrefillChunk:
        """The prefill chunk of `seq` at rows [a, a + n); over a computed prefix it carries
        the block tables its attention reads that prefix through."""
        start, blocks = seq.num_computed, None
        if start:
            nb = -(-(start + n) // self.block_size)
            blocks = to_device([h.table[:nb] for h in seq.kv], torch.long, self.device)
        return attention.PrefillChunk(a, a + n, start, blocks)

    @torch.inference_mode()
    def _probe_windows(self, layers: int, block_size: int, kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> list[int | None]:
        """Each layer's sliding window, as its attention asks for it in a one-token forward
        over a scratch cache (the model's code is the truth, not its config). An attention
        keyword the engine cannot honour raises UnsupportedAttention here, at load."""
        dev = self.device
        scratch = KVCache([Group(None, tuple(range(layers)), 1)], block_size, kv_heads,
                          head_dim, dtype, dev)
        row = torch.empty(1, block_size * kv_heads * head_dim, dtype=dtype, device=dev)
        one = torch.zeros(1, 1, dtype=torch.long, device=dev)
        ctx = attention.ForwardContext(scratch.k, scratch.v, scratch.group_of, one, row, row,
                                       prefills=[attention.PrefillChunk(0, 1, 0, None)])
        attention.set_context(ctx)
        try:
            self.model(input_ids=one, position_ids=one, use_cache=False,
                       logits_to_keep=one[0])
        finally:
            attention.set_context(None)
        return [ctx.windows.get(layer) for layer in range(layers)]

    def _packed_mask(self, segment: list[int]) -> torch.Tensor:
        """[N, N]: row i sees row j when both are in one chunk and j <= i."""
        seg = to_device(segment, torch.long, self.device)
        rows = torch.arange(len(segment), device=self.device)
        return (seg[:, None] == seg[None, :]) & (rows[None, :] <= rows[:, None])

    def _workspaces(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather buffers of at least `rows` blocks, kept across steps (grown by doubling)."""
        if self._bufs[0].shape[0] < rows:
            cache = self.kv.k[0]
            shape = (max(rows, 2 * self._bufs[0].shape[0]), cache[0].numel())
            self._bufs = tuple(torch.empty(shape, dtype=cache.dtype, device=cache.device)
                               for _ in range(2))  # type: ignore[assignment]
        return self._bufs

    def _decode_group(self, group: list[Sequence], a: int) -> attention.DecodeGroup:
        bs = self.block_size
        lens = [s.num_computed + 1 for s in group]  # context including the token fed now
        nb = -(-max(lens) // bs)
        if self.decode_kernel is not None:  # a table of one block would compile apart
            nb = max(nb, 2)
        tables = [[s.kv[gi].table[:nb] for s in group] for gi in range(len(self.kv.groups))]
        blocks = to_device([[t + [0] * (nb - len(t)) for t in ts] for ts in tables],
                           torch.long, self.device)  # [groups, G, nb]
        lens_t = to_device(lens, torch.long, self.device)
        if min(lens) == max(lens):
            return attention.DecodeGroup(a, a + len(group), blocks, None, lens[0], lens_t)
        mask = torch.arange(nb * bs, device=self.device)[None, :] < lens_t[:, None]  # [G, L]
        return attention.DecodeGroup(a, a + len(group), blocks, mask[:, None, None, :], nb * bs,
                                     lens_t)


def _groups(singles: list[Sequence], bs: int,
            split_blocks: int) -> list[tuple[list[Sequence], int]]:
    """Cut length-sorted single-token rows into groups: a new group starts where padding the
    group's shorter contexts up to the next one would cost more than `split_blocks`."""
    groups: list[tuple[list[Sequence], int]] = []
    top = 0
    for i, seq in enumerate(singles):
        nb = -(-(seq.num_computed + 1) // bs)
        if groups and (nb - top) * len(groups[-1][0]) <= split_blocks:
            groups[-1][0].append(seq)
        else:
            groups.append(([seq], i))
        top = nb
    return groups


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return psutil.virtual_memory().available
