"""A broker and one LLM worker on ipc paths in a temp dir, for benchmarks that drive the SDK.

`llm_pipeline(model_dir, max_num_seqs)` starts both as child processes, waits until the worker
has registered, yields the frontend endpoint, and stops (and reaps) both on the way out.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from zeroserve.procs import spawn, stop_all


@contextlib.contextmanager
def llm_pipeline(model_dir: Path, max_num_seqs: int, prefix: str = "zs-bench-"
                 ) -> Iterator[str]:
    from zeroserve.tooling.up import wait_ready

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        front, back = f"ipc://{tmp}/f", f"ipc://{tmp}/b"
        procs = [spawn("broker", ["--frontend", front, "--backend", back,
                                  "--admin", f"ipc://{tmp}/a", "--log-level", "WARNING"]),
                 spawn("worker", ["--broker", back, "--engine", "llm", "--model",
                                  str(model_dir), "--served-name", "bench",
                                  "--max-num-seqs", str(max_num_seqs),
                                  "--log-level", "WARNING"])]
        try:
            if not wait_ready(front, 1, 600, procs):
                raise RuntimeError("the pipeline did not come up")
            yield front
        finally:
            stop_all(procs)
