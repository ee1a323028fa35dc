"""The embedding engine: an encoder model (AutoModel) with mean pooling, dynamically batched.

Request body: {"input": str | [str], "normalize": bool (default true), "shm_domain": str}.
END carries {"outputs": {"embeddings": [n, dim] float32 tensor entry}, "usage": {...}}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from zeroserve import protocol as p
from zeroserve.config import MAX_EMBED_INPUTS, MAX_EMBED_TEXT_CHARS
from zeroserve.workers.batching import BatchingEngine, Pending
from zeroserve.workers.engine import EngineError


class EmbedEngine(BatchingEngine):
    def __init__(self, model_dir: str, served_name: str = "", max_batch_size: int = 64,
                 max_queue_delay_ms: float = 2.0, device: str = "cpu",
                 max_length: int = 512) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir)
        super().__init__(served_name or path.name, max_batch_size, max_queue_delay_ms, device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.max_length = max_length

    def parse(self, body: dict[str, Any], frames: list[bytes]) -> tuple[Any, int, list]:
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if (not isinstance(texts, list) or not 0 < len(texts) <= MAX_EMBED_INPUTS
                or not all(isinstance(t, str) and len(t) <= MAX_EMBED_TEXT_CHARS for t in texts)):
            raise EngineError(p.BAD_REQUEST, f"input must be a string or a list of 1 to "
                                             f"{MAX_EMBED_INPUTS} strings of at most "
                                             f"{MAX_EMBED_TEXT_CHARS} characters")
        normalize = body.get("normalize", True)
        if not isinstance(normalize, bool):
            raise EngineError(p.BAD_REQUEST, "normalize must be a boolean")
        return (texts, normalize), len(texts), []

    def run(self, batch: list[Pending]) -> list[dict[str, Any]]:
        texts = [t for r in batch for t in r.inputs[0]]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        hidden = self.model(**enc).last_hidden_state  # [B, T, H]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, H]
        counts = enc["attention_mask"].sum(1).tolist()
        out, i = [], 0
        for req in batch:
            emb = pooled[i:i + req.rows].float()
            if req.inputs[1]:
                emb = F.normalize(emb, p=2, dim=1)
            out.append({"embeddings": emb.cpu(),
                        "usage": {"prompt_tokens": int(sum(counts[i:i + req.rows]))}})
            i += req.rows
        return out

    def warmup(self) -> None:
        with torch.inference_mode():
            self.run([Pending((b"", "warmup"), (["warm up"], True), 1, False)])
