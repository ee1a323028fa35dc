"""The LLM worker's input processing (workers/llm/inputs.py): the ids it gives are
transformers' ids, whichever encoder it uses."""

from __future__ import annotations

from typing import Any

import pytest

from zeroserve.workers.engine import EngineError
from zeroserve.workers.llm.inputs import Inputs

TEXTS = ["plain words", "  leading spaces and\ttabs\n\nnew lines", "<s> special </s> inside",
         "ünïcode 日本語 emoji 🙂", "x" * 5000, "word " * 3000]


@pytest.fixture(scope="module")
def tokenizer(tiny_model) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_the_rust_backend_is_used_and_gives_transformers_ids(tokenizer) -> None:
    inputs = Inputs(tokenizer, 10**6, 512)
    assert inputs.fast is not None  # it agreed on the probes
    for text in TEXTS:
        assert inputs.prompt_ids({"prompt": text}) == tokenizer.encode(text)
    chat = [{"role": "user", "content": t} for t in TEXTS[:4]]
    want = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert inputs.chat_ids(chat) == list(want)
    out = inputs.text_op({"op": "tokenize", "prompt": TEXTS[3]})
    assert out["tokens"] == tokenizer.encode(TEXTS[3]) and out["count"] == len(out["tokens"])
    with pytest.raises(EngineError, match="non-empty string"):
        inputs.prompt_ids({"prompt": ""})


class _Disagrees:
    """A backend that tokenizes differently from transformers (as a custom Python tokenizer
    class can): the engine must not use it."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool = True) -> list:
        out = self.real.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        return [type("Encoding", (), {"ids": [*e.ids, 0]})() for e in out]


def test_a_backend_that_disagrees_is_not_used(tokenizer, monkeypatch) -> None:
    real = tokenizer.backend_tokenizer
    monkeypatch.setattr(type(tokenizer), "backend_tokenizer", property(lambda self: _Disagrees(
        real)))
    inputs = Inputs(tokenizer, 10**6, 512)
    assert inputs.fast is None
    monkeypatch.undo()
    assert inputs.prompt_ids({"prompt": TEXTS[1]}) == tokenizer.encode(TEXTS[1])
    chat = [{"role": "user", "content": "hi"}]
    want = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert inputs.chat_ids(chat) == list(want["input_ids"] if hasattr(want, "keys") else want)
