"""scripts/gpu_check.sh --device cpu: the GPU check's steps run end to end as a smoke test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from zeroserve.procs import stop

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(420)
def test_gpu_check_runs_every_step_on_the_cpu(tmp_path) -> None:
    out = tmp_path / "check.json"
    proc = subprocess.Popen([str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu",
                             "--out", str(out), "--logs", str(tmp_path / "logs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        stop(proc)  # its whole group, should it still run
    res = json.loads(out.read_text())
    assert proc.returncode == 0 and res["ok"], (stderr[-3000:], res)
    assert json.loads(stdout) == res  # the summary is the last thing printed
    assert res["tests"]["tests"] >= 5 and res["tests"]["failures"] == 0
    assert res["parity"]["exact"] + res["parity"]["near_ties"] == res["parity"]["prompts"]
    assert res["step"]["decode_step_ms"] > 0 and res["step"]["step_over_forward"] > 0
    b128 = res["step_b128"]
    assert b128["batch"] > res["step"]["batch"] and b128["host_step_ms"] > 0
    for name in ("serve_c32", "serve_c128"):
        serve = res[name]
        assert serve["requests_failed"] == 0 and serve["served_tok_s"] > 0, name
        assert serve["requests_ok"] == serve["num_requests"], name
        assert serve["completion_tokens"] >= serve["num_requests"], name
        assert 0 < serve["max_running"] <= serve["concurrency"], name
        assert serve["static_batch_tok_s"] > 0 and serve["hf_sequential_tok_s"] > 0, name
    assert res["serve_c128"]["concurrency"] > res["serve_c32"]["concurrency"]
    assert res["tensor"]["shm_in_ms_64mib"] > 0 and res["tensor"]["frames_in_ms_64mib"] > 0
    goals = res["goals"]
    assert goals["c128_served_over_hf_sequential"]["value"] == pytest.approx(
        res["serve_c128"]["served_over_hf_sequential"])
    assert goals["parity_divergences"]["met"]
