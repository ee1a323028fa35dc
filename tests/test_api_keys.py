"""gateway/auth.py: API keys from a file (plain or sha256 entries) and ZEROSERVE_API_KEYS, over
HTTP against a real gateway, and the key store's own refusals."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from zeroserve.gateway.auth import KeyStore

from .conftest import start_gateway


def test_the_store_keeps_digests_and_matches_bearer_tokens(tmp_path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [
        {"id": "hashed", "sha256": hashlib.sha256(b"sk-hashed").hexdigest(), "models": ["a"]},
        {"id": "plain", "key": "sk-plain", "tpm": 60}]}))
    store = KeyStore.load(str(path), env="ops:sk-ops, ci:sk-ci")
    assert [k.id for k in store.keys] == ["hashed", "plain", "ops", "ci"]
    assert "sk-plain" not in repr(store.keys)  # only digests are kept
    assert store.check("Bearer sk-hashed").id == "hashed"
    assert store.check("Bearer sk-ci").id == "ci"
    assert store.check("Bearer sk-nope") is None and store.check("sk-ci") is None
    hashed = store.check("Bearer sk-hashed")
    assert hashed.may_use("a") and not hashed.may_use("b")
    assert store.check("Bearer sk-plain").tpm == 60
    with pytest.raises(ValueError, match="id:key"):
        KeyStore.load(None, env="no-colon")


def test_a_gateway_takes_keys_from_the_environment_and_sha256_entries(
        pipeline, tmp_path, monkeypatch) -> None:
    pipeline.start_broker()
    pipeline.start_worker("echo", "--model", "echo")
    pipeline.wait_workers(1)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [
        {"id": "hashed", "sha256": hashlib.sha256(b"sk-from-hash").hexdigest()}]}))
    monkeypatch.setenv("ZEROSERVE_API_KEYS", "env-team:sk-from-env")
    url = start_gateway(pipeline, "--api-keys-file", str(path))
    body = {"model": "echo", "prompt": "a b", "max_tokens": 2}
    for secret in ("sk-from-env", "sk-from-hash"):
        r = httpx.post(f"{url}/v1/completions", json=body,
                       headers={"authorization": f"Bearer {secret}"}, timeout=30)
        assert r.status_code == 200, (secret, r.text)
    wrong = httpx.post(f"{url}/v1/completions", json=body,
                       headers={"authorization": "Bearer sk-other"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
