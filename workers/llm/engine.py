"""The LLM engine: continuous batching over a Hugging Face causal LM.

Implements the worker's Engine interface. `step()` reads as three calls, as in nano-vllm:
schedule (who runs), run (one packed forward), postprocess (sample, detokenize, check stops,
stream). Requests join between steps and leave the moment they finish or are cancelled.
KV memory is paged (block_manager.py) with automatic prefix caching and preemption.
`prepare()` does a request's text work (chat template, tokenization, validation); the worker
runtime calls it on its own thread so a huge prompt never stalls the running streams.

Request body: the generation contract (zeroserve/contract.py: every parameter, its default
and bounds); the input as a prompt, prompt_token_ids or chat messages, and the text ops
(tokenize, detokenize), in inputs.py. `resume` continues a generation another worker started
(it died): the tokens it had emitted join the sequence as already generated (they count
towards max_tokens), sampling goes on at the next token index, and text is streamed from
`text_chars` on, so the client sees neither a gap nor a repeat.
Stream delta and END: contract.Delta and contract.Finish (zeroserve/contract.py).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zeroserve import contract as c
from zeroserve import protocol as p
from zeroserve.config import LLMConfig, WorkerConfig
from zeroserve.workers.engine import EngineError, Output, RequestKey
from zeroserve.workers.llm import logits as logits_processing
from zeroserve.workers.llm import model_runner, params, prepack, sampler, stopping, support
from zeroserve.workers.llm.block_manager import BlockManager
from zeroserve.workers.llm.detok import IncrementalDetokenizer
from zeroserve.workers.llm.figures import StepFigures
from zeroserve.workers.llm.grammar import GrammarError, Grammars
from zeroserve.workers.llm.inputs import Inputs
from zeroserve.workers.llm.model_runner import ModelRunner
from zeroserve.workers.llm.scheduler import Plan, Scheduler
from zeroserve.workers.llm.sequence import Sequence
from zeroserve.workers.llm.transfer import to_host

log = logging.getLogger("zeroserve.worker")




@dataclass(frozen=True, slots=True)
class Prepared:
    """A request after its text work: what `add` needs, nothing it must parse again."""

    prompt_ids: list[int]
    params: params.SamplingParams
    resume_ids: list[int]
    resume_chars: int
    matcher: Any = None  # structured output: the matcher, already past resume_ids
    answer: dict[str, Any] | None = None  # a text op's whole reply: nothing to generate
    cache_salt: bytes = b""  # its prefix blocks' keys start from this (block_manager.py)


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, runner: ModelRunner,
                 served_name: str, max_num_seqs: int, max_batched_tokens: int,
                 prefix_caching: bool = True, check_blocks: bool = False,
                 scheduling: str = "priority") -> None:
        self.model, self.tokenizer, self.runner = model, tokenizer, runner
        self.inputs = Inputs(tokenizer, runner.vocab_size, runner.max_model_len)
        self.models = (served_name,)
        self.device = str(runner.device)
        self.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        groups = runner.kv.groups
        self.blocks = BlockManager(groups[0].num_blocks, runner.kv.block_size, prefix_caching,
                                   [g.window for g in groups], [g.num_blocks for g in groups],
                                   [len(g.layers) for g in groups])
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_batched_tokens, scheduling)
        self.check_blocks = check_blocks  # assert the block accounting after every step
        # Requests the broker may hand us: every slot, plus a short local queue so a slot
        # never idles waiting for a broker round trip.
        self.capacity = self.scheduler.max_num_seqs + max(2, self.scheduler.max_num_seqs // 2)
        self.seqs: dict[RequestKey, Sequence] = {}
        self.eos_ids = _eos_ids(model, tokenizer)
        self._grammars: Grammars | None = None  # built on the first structured-output request
        self.answers: list[Output] = []  # text ops done, sent with the next step's outputs
        self.figures = StepFigures()  # since start, sent on heartbeats (figures.py)

    @classmethod
    def from_config(cls, cfg: WorkerConfig) -> LLMEngine:
        from zeroserve.models import resolve

        path = resolve(cfg.model)
        report = support.require(path)  # UnsupportedModel: refused before any weight loads
        windows = sorted({w for w in report.window_per_layer if w})
        log.info("model %s (%s): context %s, attention %s%s", report.architecture,
                 report.model_type, report.context_length,
                 f"sliding windows {windows} on {sum(map(bool, report.window_per_layer))} of "
                 f"{report.layers} layers" if windows else "full",
                 f", logit softcap {report.attn_softcap}" if report.attn_softcap else "")
        device = torch.device(cfg.device)
        dtype, why = model_runner.pick_dtype(cfg.dtype, device)
        log.info("dtype %s (%s)", str(dtype).removeprefix("torch."), why)
        t0 = time.monotonic()
        model, tokenizer = model_runner.load(path, device, dtype)
        log.info("loaded %s on %s as %s in %.2fs", path, device, dtype, time.monotonic() - t0)
        llm = cfg.engine
        assert isinstance(llm, LLMConfig), llm
        if llm.prepack and prepack.available(device, dtype):
            log.info("packed %d Linear weights for oneDNN", prepack.prepack(model))
        compiled = llm.compiles(device.type)
        log.info("decode attention: %s", "compiled (paged_decode.py)" if compiled
                 else "uncompiled (--compile turns it on)")
        runner = ModelRunner(model, device, llm.max_model_len, llm.max_num_seqs,
                             llm.kv_cache_tokens, llm.block_size, llm.max_batched_tokens,
                             compiled)
        name = cfg.served_name or (cfg.model if "/" not in cfg.model else Path(path).name)
        return cls(model, tokenizer, runner, name, llm.max_num_seqs, llm.max_batched_tokens,
                   llm.prefix_caching, llm.check_blocks, llm.scheduling)

    # -- the Engine interface ------------------------------------------------------------

    def prepare(self, body: dict[str, Any]) -> Prepared:
        """Template, tokenize and validate a request body. Touches no engine state: the
        runtime calls it beside the engine thread."""
        if (odd := c.unknown_fields(body, c.LLM_FIELDS)) is not None:
            raise EngineError(p.BAD_REQUEST, odd)
        if body.get("op") is not None:
            return Prepared([], params.SamplingParams(), [], 0,
                            answer=self.inputs.text_op(body))
        prompt_ids = self.inputs.prompt_ids(body)
        sp = params.parse(body, self.runner.vocab_size)
        resume_ids, resume_chars = params.parse_resume(body, self.runner.vocab_size,
                                                       sp.max_tokens)
        n = len(prompt_ids)
        limit = self.runner.max_model_len
        if n + sp.max_tokens > limit:
            raise EngineError(p.BAD_REQUEST, f"prompt ({n} tokens) + max_tokens "
                                             f"({sp.max_tokens}) exceeds the model's {limit}")
        if not self.blocks.fits(n + sp.max_tokens, self.scheduler.max_batched_tokens):
            have = self.blocks.first.num_blocks * self.blocks.block_size
            raise EngineError(p.BAD_REQUEST, f"prompt ({n} tokens) + max_tokens "
                                             f"({sp.max_tokens}) can never fit this worker's KV "
                                             f"cache of {have} tokens")
        matcher = None
        if sp.schema is not None:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.runner.vocab_size, self.eos_ids)
            try:
                matcher = self._grammars.matcher(sp.schema, resume_ids)
            except GrammarError as exc:
                raise EngineError(p.BAD_REQUEST, str(exc)) from None
        return Prepared(prompt_ids, sp, resume_ids, resume_chars, matcher,
                        cache_salt=params.parse_cache_salt(body))

    def add(self, key: RequestKey, body: dict[str, Any] | Prepared,
            buffers: list[bytes]) -> None:
        req = body if isinstance(body, Prepared) else self.prepare(body)
        if req.answer is not None:
            self.answers.append(Output(key, finish={**req.answer, "finish_reason": "stop"}))
            return
        sp = req.params
        seed = sp.seed if sp.seed is not None else random.getrandbits(63)
        seq = Sequence(key, [*req.prompt_ids, *req.resume_ids], sp,
                       IncrementalDetokenizer(self.tokenizer), seed,
                       prompt_len=len(req.prompt_ids), matcher=req.matcher,
                       cache_salt=req.cache_salt)
        for token in req.resume_ids:  # the text the first worker had, rebuilt
            seq.detok.add(token)
        seq.emitted = req.resume_chars
        self.seqs[key] = seq
        self.scheduler.add(seq)
        self.figures.prompt_tokens += seq.prompt_len

    def cancel(self, key: RequestKey) -> list[Output]:
        seq = self.seqs.pop(key, None)
        if seq is None:
            return []
        self.scheduler.finish(seq)
        return [Output(key, finish={"finish_reason": "cancelled", "usage": seq.usage()})]

    def abort_all(self, code: str, message: str) -> list[Output]:
        outs = []
        for key, seq in list(self.seqs.items()):
            self.scheduler.finish(seq)
            outs.append(Output(key, error=(code, message)))
        self.seqs.clear()
        return outs

    def has_work(self) -> bool:
        return bool(self.answers) or self.scheduler.has_work()

    def step(self) -> list[Output]:
        t0 = time.perf_counter()
        answered, self.answers = self.answers + self._expire(), []
        plan = self.scheduler.schedule()
        if plan.empty:
            return answered
        logits, sampling = self.runner.forward(plan)  # [K, V], the K sequences that sample
        outs = answered + self._postprocess(plan, logits, sampling)
        if self.check_blocks:
            self.blocks.check(self.scheduler.running)
        self.figures.step(plan.chunks, time.perf_counter() - t0)
        return outs

    def warmup(self) -> None:
        """Run prefill and decode shapes at a few batch sizes before announcing READY (what
        --compile compiles, it compiles here)."""
        from tqdm import tqdm

        rng = random.Random(0)
        slots = self.scheduler.max_num_seqs
        threads = torch.get_num_threads()
        runs = [(batch, threads) for batch in sorted({1, min(8, slots), slots})]
        if self.runner.decode_kernel is not None and threads > 1:
            # the runtime steps on a thread fewer during large text work (pinning.CoreShare),
            # and a compiled kernel is specialised to its thread count: compile that one too
            runs.append((2, threads - 1))
        caching, self.blocks.prefix_caching = self.blocks.prefix_caching, False
        try:
            for batch, n in tqdm(runs, desc="warmup (batch sizes)", leave=False):
                torch.set_num_threads(n)
                for i in range(batch):
                    ids = [rng.randrange(self.runner.vocab_size)
                           for _ in range(rng.choice((8, 32, 96)))]
                    self.add((b"", f"warmup-{batch}-{n}-{i}"),
                             {"prompt_token_ids": ids, "max_tokens": 4, "ignore_eos": True}, [])
                while self.has_work():
                    self.step()
        finally:
            torch.set_num_threads(threads)
        self.blocks.prefix_caching = caching  # random warmup prompts never fill the cache
        self.scheduler.reset_figures()
        self.figures = StepFigures()

    def stats(self) -> dict[str, Any]:
        b, s = self.blocks, self.scheduler
        return {
            **s.figures(),
            "kv_blocks_used": b.num_used,
            "kv_blocks": b.num_blocks,
            "kv_block_size": b.block_size,
            "kv_tokens_used": b.tokens(used=True),
            "kv_tokens": b.tokens(used=False),
            "kv_usage": max(p.num_used / (p.num_blocks - p.reserved) for p in b.pools),
            "kv_groups": b.groups(),
            "prefix_cache_hit_tokens": b.hit_tokens,
            "prefix_cache_queried_tokens": b.queried_tokens,
            "prefix_cache_hit_rate": b.hit_tokens / b.queried_tokens if b.queried_tokens else 0.0,
            "dtype": self.dtype,
            **self.figures.as_dict(),
        }

    def close(self) -> None:
        self.abort_all(p.UNAVAILABLE, "engine closing")

    # -- steps ---------------------------------------------------------------------------

    def _postprocess(self, plan: Plan, logits: torch.Tensor,
                     sampling: list[Sequence]) -> list[Output]:
        for seq, n in plan.chunks:
            seq.num_computed += n
            self.blocks.commit(seq)
        if not sampling:
            return []
        sps = [s.params for s in sampling]
        logits = logits_processing.apply(
            logits, sps, [(s.token_ids, s.prompt_len) for s in sampling], self.eos_ids)
        constrained = [(i, s.matcher) for i, s in enumerate(sampling) if s.matcher is not None]
        if constrained:
            logits = self._grammars.mask(logits, constrained)  # type: ignore[union-attr]
        chosen = sampler.sample(logits, sps, [(s.seed, s.num_output) for s in sampling])
        asked = sampler.top_logprobs(logits, chosen, [sp.logprobs for sp in sps])
        # the step's one host synchronisation: its tokens (and logprobs) read back together
        tokens, *host = to_host([chosen, *(asked.tensors() if asked else [])])
        lps = asked.entries(host, tokens, len(tokens)) if asked else [None] * len(tokens)
        self.figures.generated_tokens += len(tokens)
        return [self._advance(seq, tok, lp) for seq, tok, lp in zip(sampling, tokens, lps,
                                                                     strict=True)]

    def _advance(self, seq: Sequence, token: int, logprob: dict | None) -> Output:
        """One sampled token: append it, decide whether the sequence ends (stopping.py), and
        the Delta (and Finish) it streams."""
        seq.token_ids.append(token)
        seq.detok.add(token)
        finish = stopping.by_token(seq, token, self.eos_ids)
        cut = stopping.cut_at_stop(seq)
        if cut:
            finish = "stop"
        elif finish is None and (seq.num_output >= seq.params.max_tokens
                                 or seq.total_len >= self.runner.max_model_len):
            finish = "length"
        delta: dict[str, Any] = {"text": stopping.new_text(seq, finish is not None, cut),
                                 "token_ids": [token]}
        if logprob is not None:
            logprob["token"] = self._piece(logprob["token_id"])
            for alt in logprob["top"]:
                alt["token"] = self._piece(alt["token_id"])
            delta["logprobs"] = [logprob]
        if finish is None:
            return Output(seq.key, delta)
        self.scheduler.finish(seq)
        self.seqs.pop(seq.key, None)
        return Output(seq.key, delta, {"finish_reason": finish, "usage": seq.usage(),
                                       "queue_ms": round(seq.queue_ms, 3)})

    def _expire(self) -> list[Output]:
        """Requests past their deadline: one that never ran fails with TIMEOUT (it cost no
        compute); one that ran ends with what it made, finish_reason "timeout"."""
        waiting, running = self.scheduler.expire(time.time())
        outs = [Output(s.key, error=(p.TIMEOUT, "its deadline passed before it ran"))
                for s in waiting]
        outs += [Output(s.key, {"text": stopping.new_text(s, True, False), "token_ids": []},
                        {"finish_reason": "timeout", "usage": s.usage()}) for s in running]
        for seq in waiting + running:
            self.seqs.pop(seq.key, None)
        return outs

    def _piece(self, token_id: int) -> str:
        """One token's own text, for logprobs (special tokens included)."""
        return self.tokenizer.decode([token_id])


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(e) for e in eos)
    return frozenset(ids)
