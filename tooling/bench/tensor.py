"""`zeroserve bench tensor`: what it costs to hand a tensor to a worker and get one back.

One run, float32 tensors of 1 MiB and 64 MiB, client -> broker -> worker -> client:
  shm_in_ms_*      input allocated in the client's arena (client.empty), filled, sent as a
                   descriptor; the module returns one element, so only the handoff counts
  frames_in_ms_*   the same input as an out-of-band zmq frame (the remote-host path)
  pickle_in_ms_*   a naive Python server: the array pickled through multiprocessing.Queue
  shm_out_ms_64mib the module returns a 64 MiB tensor: one copy into the worker's arena
  memcpy_ms_64mib  the floor: one 64 MiB copy inside one process
Each figure is the median of --repeat round trips. With --device cuda the workers run their
modules on the GPU: inputs cross to it and outputs back, inside each round trip.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from zeroserve.procs import spawn, stop_all
from zeroserve.tooling.bench.stats import report

SIZES = {"1mib": 1 << 20, "64mib": 64 << 20}
MESSAGE_MB = 80


def _median_ms(fn: Callable[[], object], repeat: int, bar: tqdm) -> float:
    fn()  # warm: maps arenas, fills pools
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
        bar.update()
    return statistics.median(times)


def _queue_worker(inq: mp.Queue, outq: mp.Queue) -> None:
    while True:
        arr = inq.get()
        if arr is None:
            return
        outq.put(arr.reshape(-1)[:1].copy())


def pickle_baseline(repeat: int, bar: tqdm) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    inq, outq = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_queue_worker, args=(inq, outq), daemon=True)
    proc.start()
    out = {}
    try:
        for label, nbytes in SIZES.items():
            arr = np.ones(nbytes // 4, dtype=np.float32)

            def once(arr: np.ndarray = arr) -> None:
                inq.put(arr)
                outq.get()

            out[f"pickle_in_ms_{label}"] = _median_ms(once, repeat, bar)
    finally:
        inq.put(None)
        proc.join(10)
    return out


def run(repeat: int, device: str = "cpu") -> dict[str, float]:
    from zeroserve.client import Client
    from zeroserve.tooling.up import wait_ready

    res: dict[str, float] = {}
    bar = tqdm(total=repeat * 8, desc="bench tensor", leave=False)
    with tempfile.TemporaryDirectory(prefix="zs-bench-") as tmp:
        front, back = f"ipc://{tmp}/f", f"ipc://{tmp}/b"
        # a 64 MiB tensor as a frame, with its header, is past the 64 MiB default limit
        limit = ["--max-message-mb", str(MESSAGE_MB)]
        procs = [spawn("broker", ["--frontend", front, "--backend", back,
                                  "--admin", f"ipc://{tmp}/a", *limit,
                                  "--log-level", "WARNING"])]
        for name in ("first_element", "big_output"):
            procs.append(spawn("worker", [
                "--broker", back, "--engine", "tensor", "--model", name, "--no-pin",
                "--module", f"zeroserve.tooling.bench.modules:{name}", "--device", device, *limit,
                "--log-level", "WARNING"]))
        try:
            if not wait_ready(front, 2, 120, procs):
                raise RuntimeError("the pipeline did not come up")
            with Client(front, max_message_mb=MESSAGE_MB) as client:
                for label, nbytes in SIZES.items():
                    x = client.empty((nbytes // 4,), torch.float32)
                    x.fill_(1.0)
                    res[f"shm_in_ms_{label}"] = _median_ms(
                        lambda x=x: client.infer("first_element", {"x": x}), repeat, bar)
                    y = torch.ones(nbytes // 4)
                    res[f"frames_in_ms_{label}"] = _median_ms(
                        lambda y=y: client.infer("first_element", {"x": y}, shm=False),
                        repeat, bar)
                tiny = torch.zeros(1)
                res["shm_out_ms_64mib"] = _median_ms(
                    lambda: client.infer("big_output", {"x": tiny}), repeat, bar)
        finally:
            stop_all(procs)
    res.update(pickle_baseline(repeat, bar))
    src, dst = torch.ones(16 << 20), torch.empty(16 << 20)
    res["memcpy_ms_64mib"] = _median_ms(lambda: dst.copy_(src), repeat, bar)
    bar.close()
    res["shm_64_over_1mib"] = res["shm_in_ms_64mib"] / res["shm_in_ms_1mib"]
    res["pickle_over_shm_64mib"] = res["pickle_in_ms_64mib"] / res["shm_in_ms_64mib"]
    res["shm_out_over_memcpy_64mib"] = res["shm_out_ms_64mib"] / res["memcpy_ms_64mib"]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve bench tensor", description=__doc__)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--device", default="cpu", help="the tensor workers' device: cpu or cuda")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report({"device": args.device, **run(args.repeat, args.device)}, args.json,
           f"zeroserve bench tensor (float32, median ms, workers on {args.device})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
