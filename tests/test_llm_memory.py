"""The engine's memory model: paged KV, prefix caching, preemption, admission by blocks.

Every engine here checks its block accounting after each step (check_blocks), and runs in
float32 against a float32 reference (parity compares like with like).
"""

from __future__ import annotations

import random

import pytest
import torch

from zeroserve.config import LLMConfig, WorkerConfig
from zeroserve.workers.engine import EngineError
from zeroserve.workers.llm.engine import LLMEngine

from .test_llm import hf_greedy, run_all


def make_engine(model, **kw) -> LLMEngine:
    torch.set_num_threads(1)
    cfg = {"max_num_seqs": 16, "max_batched_tokens": 64, "max_model_len": 512,
           "kv_cache_tokens": 64 * 512, "block_size": 16, "check_blocks": True, **kw}
    eng = LLMEngine.from_config(WorkerConfig(broker="-", engine=LLMConfig(**cfg),
                                             model=str(model), dtype="float32"))
    eng.warmup()
    return eng


@pytest.fixture(scope="module")
def engine(tiny_model) -> LLMEngine:
    return make_engine(tiny_model)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def assert_greedy(reference, ids: list[int], ours: list[int]) -> None:
    """Ours equals HF's greedy run, or diverges only at a near-tie of HF's own top-2."""
    theirs, scores = hf_greedy(reference, ids, len(ours))
    if ours != theirs:
        step = next(k for k, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
        top2 = torch.topk(scores[step], 2).values
        assert float(top2[0] - top2[1]) < 1e-3, f"diverges at step {step}"


def greedy(ids: list[int], n: int = 16) -> dict:
    return {"prompt_token_ids": ids, "max_tokens": n, "temperature": 0, "ignore_eos": True}


def test_prefix_sharing_0_1_partial_and_many_blocks_keeps_greedy_parity(engine,
                                                                        reference) -> None:
    rng = random.Random(11)
    vocab = engine.runner.vocab_size
    base = [rng.randrange(vocab) for _ in range(100)]
    tail = [rng.randrange(vocab) for _ in range(20)]
    prompts = {"none": [rng.randrange(vocab) for _ in range(50)], "one": base[:16] + tail,
               "partial": base[:40] + tail, "many": base[:96] + tail}
    first = run_all(engine, {0: [("base", greedy(base))]})["base"]
    assert first["finish"]["usage"]["cached_tokens"] == 0
    res = run_all(engine, {0: [(k, greedy(v)) for k, v in prompts.items()]})
    cached = {k: res[k]["finish"]["usage"]["cached_tokens"] for k in prompts}
    assert cached == {"none": 0, "one": 16, "partial": 32, "many": 96}
    for k, ids in prompts.items():
        assert_greedy(reference, ids, res[k]["ids"])
    again = run_all(engine, {0: [("base2", greedy(base))]})["base2"]  # second time: cached
    assert again["finish"]["usage"]["cached_tokens"] == 96 and again["ids"] == first["ids"]
    assert engine.blocks.hit_tokens >= 16 + 32 + 96 + 96


def test_chat_turns_reuse_the_conversation_so_far(engine) -> None:
    msgs = [{"role": "system", "content": "You are terse. " * 30},
            {"role": "user", "content": "first question"}]
    one = run_all(engine, {0: [("t1", {"messages": msgs, "max_tokens": 8,
                                       "temperature": 0})]})["t1"]
    msgs += [{"role": "assistant", "content": one["text"]},
             {"role": "user", "content": "second question"}]
    two = run_all(engine, {0: [("t2", {"messages": msgs, "max_tokens": 8,
                                       "temperature": 0})]})["t2"]
    usage = two["finish"]["usage"]
    assert usage["cached_tokens"] >= (one["finish"]["usage"]["prompt_tokens"] // 16 - 1) * 16
    assert usage["cached_tokens"] > 0


def test_preemption_under_a_tiny_block_budget_keeps_outputs_exact(tiny_model,
                                                                  reference) -> None:
    # 12 blocks of 16 tokens; 6 requests that each grow to 5 blocks cannot all run at once
    eng = make_engine(tiny_model, kv_cache_tokens=12 * 16, max_num_seqs=6)
    rng = random.Random(4)
    vocab = eng.runner.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(20, 30))] for _ in range(6)]
    sampled = {"prompt_token_ids": prompts[0], "max_tokens": 45, "temperature": 0.9,
               "top_k": 40, "seed": 7, "ignore_eos": True}
    alone = run_all(eng, {0: [("alone", sampled)]})["alone"]["ids"]
    eng.scheduler.preemptions = 0
    joins = {0: [(f"g{i}", greedy(ids, 45)) for i, ids in enumerate(prompts)],
             1: [("seeded", sampled)]}
    res = run_all(eng, joins)
    assert eng.scheduler.preemptions > 0, "the budget was meant to force preemption"
    for i, ids in enumerate(prompts):
        assert len(res[f"g{i}"]["ids"]) == 45  # no duplicate, no missing token
        assert_greedy(reference, ids, res[f"g{i}"]["ids"])
    assert res["seeded"]["ids"] == alone
    assert eng.blocks.num_used == 0


def test_continuous_batching_runs_sequences_together(engine) -> None:
    seen_together = False
    order: list[str] = []
    engine.add((b"t", "long"), greedy([5, 6, 7, 8], 40), [])
    step = 0
    while engine.has_work():
        if step == 3:
            engine.add((b"t", "short"), greedy([9, 10, 11], 3), [])
        outs = engine.step()
        seen_together |= {o.key[1] for o in outs} == {"long", "short"}
        order += [o.key[1] for o in outs if o.finish]
        step += 1
    assert seen_together, "the short request never shared a step with the long one"
    assert order == ["short", "long"]


def test_a_prompt_that_can_never_fit_is_refused_and_one_that_fits_later_waits(
        tiny_model) -> None:
    eng = make_engine(tiny_model, kv_cache_tokens=8 * 16, max_num_seqs=4)
    with pytest.raises(EngineError, match="can never fit"):
        eng.add((b"t", "huge"), greedy(list(range(100)), 40), [])
    assert (b"t", "huge") not in eng.seqs
    # each needs 6 of the 8 blocks: the second waits for the first to finish
    joins = {0: [("a", greedy(list(range(1, 61)), 30)), ("b", greedy(list(range(2, 62)), 30))]}
    first_token_step: dict[str, int] = {}
    finish_step: dict[str, int] = {}
    step = 0
    for rid, body in joins[0]:
        eng.add((b"t", rid), body, [])
    while eng.has_work():
        for o in eng.step():
            first_token_step.setdefault(o.key[1], step)
            if o.finish:
                finish_step[o.key[1]] = step
                assert o.finish["finish_reason"] == "length"
        step += 1
    assert first_token_step["b"] > finish_step["a"]


def test_cancel_leaves_no_block_referenced(engine) -> None:
    for i in range(30):
        engine.add((b"t", f"x{i}"), greedy([i + 3] * 40, 30), [])
    for _ in range(4):
        engine.step()
    for i in range(0, 30, 3):
        engine.cancel((b"t", f"x{i}"))
    while engine.has_work():
        engine.step()
    assert engine.blocks.num_used == 0 and not any(engine.blocks.refs)
    engine.blocks.check([])


def test_stats_report_blocks_hits_and_preemptions(engine) -> None:
    stats = engine.stats()
    for key in ("kv_blocks_used", "kv_blocks", "kv_tokens_used", "kv_tokens",
                "prefix_cache_hit_rate", "preemptions", "running", "waiting", "max_running"):
        assert key in stats
    assert stats["kv_tokens"] == stats["kv_blocks"] * 16 == 64 * 512
    assert 0 < stats["prefix_cache_hit_rate"] <= 1 and stats["max_running"] >= 2


def _stream(eng: LLMEngine, bodies: dict[str, dict]) -> tuple[list[str], dict[str, list[int]]]:
    """Add every body, step until idle: the order requests first produced a token in, and
    each one's tokens."""
    for name, body in bodies.items():
        eng.add((b"t", name), body, [])
    first: list[str] = []
    tokens: dict[str, list[int]] = {name: [] for name in bodies}
    while eng.has_work():
        for out in eng.step():
            assert out.error is None, out.error
            if out.delta:
                if not tokens[out.key[1]]:
                    first.append(out.key[1])
                tokens[out.key[1]] += out.delta["token_ids"]
    return first, tokens


def test_priority_admits_the_most_urgent_first_and_changes_no_token(tiny_model) -> None:
    rng = random.Random(5)
    bodies = {name: {**greedy([rng.randrange(500) for _ in range(40)], 8), "priority": prio}
              for name, prio in (("batch-a", 10), ("chat", 0), ("batch-b", 10), ("ops", -5))}
    seeded = {"sampled": {**greedy([7] * 30, 8), "temperature": 0.9, "seed": 3,
                          "priority": 10}}
    by_priority = make_engine(tiny_model, max_num_seqs=1)
    order, tokens = _stream(by_priority, {**bodies, **seeded})
    assert order == ["ops", "chat", "batch-a", "batch-b", "sampled"]
    fcfs = make_engine(tiny_model, max_num_seqs=1, scheduling="fcfs")
    order_fcfs, tokens_fcfs = _stream(fcfs, {**bodies, **seeded})
    assert order_fcfs == ["batch-a", "chat", "batch-b", "ops", "sampled"]
    assert tokens == tokens_fcfs  # the same tokens, greedy and seeded, only sooner or later


@pytest.mark.parametrize("scheduling,victim", [("priority", "background"), ("fcfs", "urgent")])
def test_kv_pressure_preempts_the_least_urgent_not_the_newest(tiny_model, scheduling,
                                                               victim) -> None:
    # two long generations that cannot both fit: the urgent one arrives second (fcfs
    # preempts the newest, whatever its priority)
    eng = make_engine(tiny_model, kv_cache_tokens=10 * 16, max_num_seqs=2,
                      scheduling=scheduling)
    rng = random.Random(6)
    bodies = {"background": {**greedy([rng.randrange(500) for _ in range(40)], 60),
                             "priority": 5},
              "urgent": {**greedy([rng.randrange(500) for _ in range(40)], 60), "priority": 0}}
    for name, body in bodies.items():
        eng.add((b"t", name), body, [])
    preempted: set[str] = set()
    while eng.has_work():
        eng.step()
        preempted |= {s.key[1] for s in eng.scheduler.waiting if s.preemptions}
    assert eng.stats()["preemptions"] > 0
    assert preempted == {victim}


def test_an_urgent_arrival_takes_the_seat_of_a_less_urgent_one(tiny_model) -> None:
    rng = random.Random(7)
    batch = {**greedy([rng.randrange(500) for _ in range(40)], 40), "priority": 10}
    chat = {**greedy([rng.randrange(500) for _ in range(20)], 8), "priority": 0}
    solo = make_engine(tiny_model, max_num_seqs=1)
    _, alone = _stream(solo, {"batch": batch})
    eng = make_engine(tiny_model, max_num_seqs=1)
    eng.add((b"t", "batch"), batch, [])
    got: dict[str, list[int]] = {"batch": [], "chat": []}
    ended: list[str] = []
    for step in range(400):
        if step == 5:  # the batch job holds the only seat, mid-generation
            eng.add((b"t", "chat"), chat, [])
        for out in eng.step():
            got[out.key[1]] += out.delta["token_ids"] if out.delta else []
            if out.finish:
                ended.append(out.key[1])
        if not eng.has_work():
            break
    assert ended == ["chat", "batch"]  # the chat did not wait for the seat
    assert got["batch"] == alone["batch"]  # displaced and resumed: the same tokens


def test_past_its_deadline_a_request_stops_with_what_it_made_or_never_runs(tiny_model) -> None:
    import time

    from zeroserve import protocol as p

    eng = make_engine(tiny_model, max_num_seqs=1)
    now = time.time()
    eng.add((b"t", "long"), {**greedy([5] * 20, 480), "deadline": now + 0.25}, [])
    eng.add((b"t", "queued"), {**greedy([6] * 20, 8), "deadline": now + 0.1}, [])
    tokens: dict[str, int] = {"long": 0, "queued": 0}
    ends: dict[str, object] = {}
    steps_after = 0
    while eng.has_work():
        steps_after += time.time() > now + 0.25
        for out in eng.step():
            tokens[out.key[1]] += len(out.delta["token_ids"]) if out.delta else 0
            if out.finish or out.error:
                ends[out.key[1]] = out.finish["finish_reason"] if out.finish else out.error[0]
    assert ends == {"queued": p.TIMEOUT, "long": "timeout"}
    assert tokens["queued"] == 0 and 0 < tokens["long"] < 480
    assert steps_after <= 1  # no compute after the deadline but the step it fell in
    assert eng.stats()["deadline_misses"] == 2
