"""Decode attention compiled by inductor (`--compile`): one kernel over the paged KV cache.

One query a sequence attends over its context through its block table: the kernel indexes
each block inside its reductions, and inductor fuses the indexing, the mask, the float32
softmax and both products into a few loops, so no K or V is copied contiguous for a matmul
and no mask tensor is built. On CUDA it reads the blocks where they lie. On CPU it reads K
where it lies too (its scores loop takes a position's heads together: each block in order,
which streams from memory), but V's blocks are first copied whole into the runner's
workspace (`_stage_values`): its weighted sum reads a head's row at a time across the
context, a stride the hardware does not prefetch. Staging V alone, not K and V, made the
decode step at batch 32 1.05-1.09x faster with contexts of 64-192 tokens, 1.08x at 128-384
and 1.13x at 192-576 (the same engine alternating the two, step by step).

It is compiled with symbolic sizes, so one kernel serves every batch and context length (no
buckets, no padding of the batch): a row count of 1 is the one size torch would compile
apart, so a lone sequence runs twice over. Sliding-window layers get their own variant, and
so does each thread count torch steps on (the runtime narrows it by one during large text
work). The engine's warmup compiles them all before the worker says READY, a log line each;
inductor keeps what it built on disk (ZEROSERVE_CACHE/inductor), so a restarted worker loads
a kernel in 1.6 s instead of compiling it in 8 s (2 cores).

Measured (`zeroserve bench step --model small`, bfloat16, 2 cores of an AMD EPYC), with K and
V both staged: the decode step at batch 32 took 26.9 / 27.7 ms against 32.8 / 35.2 ms
uncompiled; at batch 1 the two are even (about 9 ms, the weights' read). Served (`bench
serve --rounds 3 --baselines engine`, concurrency 32): 586 against 479 tok/s.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from zeroserve.models import cache_root

log = logging.getLogger("zeroserve.worker")


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           blocks: torch.Tensor, v_blocks: torch.Tensor, lens: torch.Tensor, window: int,
           scale: float) -> torch.Tensor:
    """q [G, H, 1, D]; caches [num_blocks, bs, Hkv, D]; blocks and v_blocks [G, nb], the
    block tables of K and of V (the same where V is not staged); lens [G] context lengths
    (the query is the last position); window 0: full attention. Query heads that share a KV
    head read it together (no repeat of K and V) -> [G, H, 1, D]."""
    g, h, _, d = q.shape
    nb = blocks.shape[1]
    bs, kv_heads = k_cache.shape[1], k_cache.shape[2]
    qf = q.reshape(g, 1, 1, kv_heads, h // kv_heads, d).float()
    k = k_cache[blocks].unsqueeze(4)  # [G, nb, bs, Hkv, 1, D]: fused into the reduction
    v = v_cache[v_blocks].unsqueeze(4)
    scores = (qf * k.float()).sum(-1) * scale  # [G, nb, bs, Hkv, rep]
    pos = torch.arange(nb * bs, device=q.device).view(1, nb, bs, 1, 1)
    end = lens.view(g, 1, 1, 1, 1)
    hide = pos >= end
    if window:  # transformers' sliding window: the last `window` positions
        hide = hide | (pos < end - window)
    scores = scores.masked_fill(hide, float("-inf"))
    top = scores.amax(dim=(1, 2), keepdim=True)
    e = torch.exp(scores - top)
    w = e / e.sum(dim=(1, 2), keepdim=True)
    out = (w.unsqueeze(-1) * v.float()).sum(dim=(1, 2))  # [G, Hkv, rep, D]
    return out.to(q.dtype).view(g, h, 1, d)


class CompiledDecode:
    """`decode`, compiled on first use of each variant, with a log line for each compile."""

    def __init__(self) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        import torch._inductor.config as inductor
        import torch.fx.experimental._config as fx

        inductor.compile_threads = 1  # no pool of compile processes beside each worker
        fx.use_duck_shape = False  # sizes equal by chance (12 heads, 12 blocks) stay apart
        self.fn = torch.compile(decode, dynamic=True)
        self.rows = torch.arange(0)  # 0, 1, 2, ...: the block table of staged blocks

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 blocks: torch.Tensor, lens: torch.Tensor, window: int, scale: float,
                 v_buf: torch.Tensor) -> torch.Tensor:
        """As `decode` over one block table; on CPU V's blocks are first copied into the
        workspace v_buf ([rows, block_size * Hkv * D]), whole blocks at a time."""
        v_blocks = blocks
        if q.device.type == "cpu":
            v_cache, v_blocks = self._stage_values(v_cache, blocks, v_buf)
        if q.shape[0] == 1:  # the one row count torch compiles apart: run it twice over
            q, blocks, v_blocks, lens = (torch.cat([t, t]) for t in (q, blocks, v_blocks, lens))
            return self._run(q, k_cache, v_cache, blocks, v_blocks, lens, window, scale)[:1]
        return self._run(q, k_cache, v_cache, blocks, v_blocks, lens, window, scale)

    def _stage_values(self, v_cache: torch.Tensor, blocks: torch.Tensor, v_buf: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """V's blocks copied side by side into the workspace, and the block table that reads
        them there (0 .. n - 1): a memcpy of each whole block streams from memory, where
        the kernel's own reads of V, a head's row at a time across the context, do not."""
        n = blocks.numel()
        if self.rows.numel() < n:
            self.rows = torch.arange(max(n, 2 * self.rows.numel()), device=blocks.device)
        rows = torch.index_select(v_cache.view(v_cache.shape[0], -1), 0, blocks.flatten(),
                                  out=v_buf[:n])
        return rows.view(n, *v_cache.shape[1:]), self.rows[:n].view(blocks.shape)

    def _run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             blocks: torch.Tensor, v_blocks: torch.Tensor, lens: torch.Tensor, window: int,
             scale: float) -> torch.Tensor:
        graphs, t0 = _graphs(), time.monotonic()
        args = (q, k_cache, v_cache, blocks, v_blocks, lens, window, scale)
        try:
            out = self.fn(*args)
        except Exception as exc:  # e.g. no C++ compiler on this host
            if self.fn is decode:
                raise
            log.error("decode attention could not compile (%s: %s); it runs uncompiled",
                      type(exc).__name__, (str(exc).strip().splitlines() or [""])[0])
            self.fn = decode
            return decode(*args)
        if _graphs() != graphs:
            log.info("compiled decode attention (%s, %s, %d query head(s) per KV head, %d "
                     "threads) in %.1fs",
                     f"sliding window {window}" if window else "full attention",
                     str(q.dtype).removeprefix("torch."), q.shape[1] // k_cache.shape[2],
                     torch.get_num_threads(), time.monotonic() - t0)
        return out


def _graphs() -> int:
    """Graphs dynamo has compiled in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
