"""`zeroserve chaos` end to end: every fault row on a live tiny-model pipeline meets its bound."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

ROWS = ["kill-1-of-2", "kill-all", "sigstop", "engine-error", "broker-kill", "broker-restart",
        "broker-rolling",
        "broker-sigstop", "brokers-all-dead", "cut-100",
        "abort-10-of-100", "oversized", "drain", "gateway-kill", "slow-consumer"]


@pytest.mark.timeout(600)
def test_chaos_suite_passes_every_row(tiny_model) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "zeroserve.tooling.cli", "chaos", "--json",
                             "--model", str(tiny_model)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=540)
    finally:
        if proc.poll() is None:  # SIGTERM: the suite reaps the pipeline it started
            proc.terminate()
            proc.wait(30)
    assert out.strip(), err[-5000:]
    res = json.loads(out)
    print(json.dumps(res["rows"], indent=1))
    assert [r["fault"] for r in res["rows"]] == ROWS
    failed = [r for r in res["rows"] if not r["ok"]]
    assert not failed, failed
    assert all(r["lost"] == 0 for r in res["rows"])
    assert res["left_ok"], res["left_behind"]
    assert proc.returncode == 0
