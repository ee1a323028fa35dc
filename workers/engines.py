"""Which engine a worker runs: `build(cfg)` constructs the one its config names (echo, LLM,
tensor, embeddings), importing only that one's code (torch and transformers load here).
"""

from __future__ import annotations

from zeroserve.config import EchoConfig, EmbedConfig, LLMConfig, TensorConfig, WorkerConfig
from zeroserve.workers.engine import Engine


def build(cfg: WorkerConfig) -> Engine:
    """Construct the engine named by the config (heavy imports happen only here)."""
    eng = cfg.engine
    if isinstance(eng, EchoConfig):
        from zeroserve.workers.echo import EchoEngine

        return EchoEngine(cfg.served_name or cfg.model, cfg.capacity, eng.step_delay_ms)
    if isinstance(eng, LLMConfig):
        from zeroserve.workers.llm.engine import LLMEngine

        return LLMEngine.from_config(cfg)
    if isinstance(eng, TensorConfig):
        from zeroserve.workers.tensor import TensorEngine, load_factory

        return TensorEngine(load_factory(eng.module), cfg.served_name or cfg.model,
                            eng.max_batch_size, eng.max_queue_delay_ms, cfg.device)
    if isinstance(eng, EmbedConfig):
        from zeroserve.workers.embed import EmbedEngine

        return EmbedEngine(cfg.model, cfg.served_name, eng.max_batch_size,
                           eng.max_queue_delay_ms, cfg.device)
    raise ValueError(f"unknown engine {eng!r}")
