"""The embedded default models: small Llama-architecture models with random weights.

`zeroserve make-model [tiny|small]` (tooling/make_model.py) builds one deterministically
(same bytes every build): a byte-level BPE tokenizer trained offline on text shipped in the
package, a chat template, and a randomly initialised LlamaForCausalLM saved as safetensors.
Built once into the user's cache dir (ZEROSERVE_CACHE, else ~/.cache/zeroserve) under a file
lock, so concurrent workers wait for one build instead of racing. Outputs are gibberish; the
compute path is real.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

BUILD_VERSION = 2  # bump when the build recipe changes: the cache key changes with it

SPECIAL_TOKENS = ["<|endoftext|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Tools and tool calls render in the Hermes format (<tool_call>{"name", "arguments"}</tool_call>),
# the one the gateway's "auto" tool choice parses (gateway/tools.py).
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\nYou may call these tools; answer each call as "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'tool' %}<tool_response>{{ m['content'] }}</tool_response>"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{\"name\": "
    "{{ c['function']['name'] | tojson }}, \"arguments\": "
    "{{ c['function']['arguments'] | tojson }}}</tool_call>{% endfor %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position: int


PRESETS = {
    # tests: builds in about a second, a forward pass in well under a millisecond per token
    "tiny": Preset(2048, 128, 2, 4, 2, 256, 2048),
    # benchmarks: about GPT-2-small size (12 layers, hidden 768)
    "small": Preset(8192, 768, 12, 12, 12, 3072, 2048),
    # the GPU check's bandwidth-bound model: TinyLlama-1.1B's shape (22 layers, hidden 2048,
    # 32 query heads over 4 KV heads), 1.0B parameters; 4 GB on disk, built on first use
    "medium": Preset(8192, 2048, 22, 32, 4, 5632, 4096),
}


def cache_root() -> Path:
    root = os.environ.get("ZEROSERVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "zeroserve"


def model_dir(preset: str) -> Path:
    spec = json.dumps({"v": BUILD_VERSION, **asdict(PRESETS[preset])}, sort_keys=True)
    return cache_root() / "models" / f"{preset}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def resolve(model: str) -> Path:
    """A preset name builds (once) and returns its cached directory; anything else is a path."""
    if model in PRESETS:
        return ensure_built(model)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                                "local model directory with a config.json")
    return path


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_built(preset: str, progress: bool = True) -> Path:
    target = model_dir(preset)
    if (target / "DONE").exists():
        return target
    with _lock(target.with_suffix(".lock")):
        if (target / "DONE").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(preset, tmp, progress)
            (tmp / "DONE").write_text("ok\n")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_tokenizer(vocab_size: int):  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("zeroserve").joinpath("data/corpus.txt").read_text("utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer, length=None)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|end|>",
        pad_token="<|endoftext|>", unk_token=None, chat_template=CHAT_TEMPLATE,
    )


def build(preset: str, out: Path, progress: bool = True) -> None:
    """Build preset `preset` into directory `out` (deterministic)."""
    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = PRESETS[preset]
    with tqdm(total=4, desc=f"building model {preset}", disable=not progress) as bar:
        tokenizer = train_tokenizer(spec.vocab_size)
        bar.update()
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads,
            max_position_embeddings=spec.max_position,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            dtype="float32",
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        # Wider init than the default so greedy outputs vary with the prompt instead of
        # collapsing onto one token: gibberish, but gibberish that exercises the sampler.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 2:
                    param.normal_(0.0, 1.0 / param.shape[1] ** 0.5)
        bar.update()
        model.generation_config.do_sample = False
        model.save_pretrained(out, safe_serialization=True)
        bar.update()
        tokenizer.save_pretrained(out)
        bar.update()
