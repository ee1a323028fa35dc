"""`zeroserve bench transport`: what the broker costs on top of the sockets themselves.

One run, the same echo worker program and the same raw-DEALER client on every path, for a
100-byte request answered by a one-chunk reply (END carries the token):
  direct  client DEALER bound, the worker's DEALER connected to it: no hop in between
  proxy   a zmq.proxy C device (ROUTER front, DEALER back): the floor for any broker
  broker  the zeroserve broker
With --curve, two more over tcp on loopback: `tcp` (the broker with --insecure) and `curve`
(the broker with CURVE keys for the client and the worker), both up at once and measured in
alternating rounds, so the cost of encryption and authentication reads as curve over tcp, like
for like.
Round trip p50/p99 one request at a time, then pipelined throughput with 64 in flight.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from collections.abc import Callable

import zmq
from tqdm import tqdm

from zeroserve import protocol as p
from zeroserve.procs import spawn, stop
from zeroserve.tooling.bench.stats import percentile, report

ROUTE = b"bench"
PROMPT = "x" * 100  # one whitespace token of 100 bytes: a one-chunk reply


def _worker(backend: str, heartbeat_s: float, extra: tuple[str, ...] = ()) -> object:
    return spawn("worker", ["--broker", backend, "--engine", "echo", "--no-pin",
                            "--capacity", "256", "--heartbeat-interval-s", str(heartbeat_s),
                            "--log-level", "WARNING", *extra])


def _measure(sock: zmq.Socket, prefix: list[bytes], rtt_n: int, tput_n: int,
             inflight: int, bar: tqdm) -> tuple[list[float], float]:
    frames = [p.request(f"r{i}", "echo", {"prompt": PROMPT}) for i in range(max(rtt_n, tput_n))]

    def send(i: int) -> None:
        sock.send_multipart([*prefix, *frames[i]])

    def recv_end() -> None:
        while True:
            msg = sock.recv_multipart()
            if msg[len(prefix) + 1] in (p.END, p.ERROR):
                return

    for i in range(200):  # warm up the path
        send(i)
        recv_end()
    rtts = []
    for i in range(rtt_n):
        t0 = time.perf_counter()
        send(i)
        recv_end()
        rtts.append((time.perf_counter() - t0) * 1e6)
        if i % 100 == 0:
            bar.update(100)
    t0 = time.perf_counter()
    sent = done = 0
    while sent < min(inflight, tput_n):
        send(sent)
        sent += 1
    while done < tput_n:
        recv_end()
        done += 1
        if sent < tput_n:
            send(sent)
            sent += 1
    rate = tput_n / (time.perf_counter() - t0)
    bar.update(tput_n // 100)
    return rtts, rate


def _wait_connected(sock: zmq.Socket, prefix: list[bytes]) -> None:
    """Until one request comes back: the worker has connected (or registered)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sock.send_multipart([*prefix, *p.request("probe", "echo", {"prompt": "x"})])
        if sock.poll(500):
            while sock.poll(100):
                sock.recv_multipart()
            return
    raise TimeoutError("worker never answered")


def _dealer(ctx: zmq.Context, endpoint: str, bind: bool = False) -> Callable[[], zmq.Socket]:
    """A phase's client socket: a DEALER bound to or connected to `endpoint`."""
    def make() -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.bind(endpoint) if bind else s.connect(endpoint)
        return s
    return make


def run(rtt_n: int, tput_n: int, inflight: int, curve: bool = False) -> dict[str, float]:
    ctx = zmq.Context()
    out: dict[str, float] = {}
    bar = tqdm(total=(5 if curve else 3) * (rtt_n + tput_n // 100), desc="bench transport",
               unit="req", leave=False)
    with tempfile.TemporaryDirectory(prefix="zs-bench-") as tmp:
        def path(name: str) -> str:
            return f"ipc://{tmp}/{name}"

        def phase(name: str, connect: Callable[[], zmq.Socket], prefix: list[bytes],
                  backend: str, heartbeat_s: float, extra: tuple[str, ...] = ()) -> None:
            worker = _worker(backend, heartbeat_s, extra)
            try:
                sock = connect()
                _wait_connected(sock, prefix)
                rtts, rate = _measure(sock, prefix, rtt_n, tput_n, inflight, bar)
                out[f"{name}_rtt_us_p50"] = percentile(rtts, 50)
                out[f"{name}_rtt_us_p99"] = percentile(rtts, 99)
                out[f"{name}_msgs_per_s"] = rate
                sock.close(0)
            finally:
                stop(worker)

        # direct: the client stands where the broker would; the worker connects to it
        phase("direct", _dealer(ctx, path("direct"), bind=True), [ROUTE], path("direct"), 60.0)

        # proxy: a C device; the worker's DEALER sees [client id, ...] as its route frame
        front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        front.bind(path("pf"))
        back.bind(path("pb"))
        threading.Thread(target=_proxy, args=(front, back), daemon=True).start()

        phase("proxy", _dealer(ctx, path("pf")), [], path("pb"), 60.0)

        broker = spawn("broker", ["--frontend", path("bf"), "--backend", path("bb"),
                                  "--admin", path("ba"), "--log-level", "WARNING"])
        try:
            phase("broker", _dealer(ctx, path("bf")), [], path("bb"), 1.0)
        finally:
            stop(broker)
        if curve:
            _tcp_phases(ctx, f"{tmp}/keys", rtt_n, tput_n, inflight, bar, out)
    bar.close()
    ctx.destroy(linger=0)
    out["broker_over_proxy_rtt_p50"] = out["broker_rtt_us_p50"] / out["proxy_rtt_us_p50"]
    out["broker_over_proxy_msgs"] = out["broker_msgs_per_s"] / out["proxy_msgs_per_s"]
    if curve:
        out["curve_over_broker_rtt_p50"] = out["curve_rtt_us_p50"] / out["broker_rtt_us_p50"]
        out["curve_over_broker_msgs"] = out["curve_msgs_per_s"] / out["broker_msgs_per_s"]
    return out


def _tcp_phases(ctx: zmq.Context, keys_dir: str, rtt_n: int, tput_n: int, inflight: int,
                bar: tqdm, out: dict[str, float], rounds: int = 10) -> None:
    """The broker over loopback tcp, open (--insecure) and with CURVE, both up at once and
    measured in alternating rounds so that machine noise falls on both alike."""
    import contextlib
    import statistics

    from zeroserve.keys import PeerKeys, curve_client, generate

    for name, role in (("broker", "broker"), ("bench", "client"), ("worker", "worker")):
        generate(keys_dir, name, role)
    socks: dict[str, zmq.Socket] = {}
    rtts: dict[str, list[list[float]]] = {"tcp": [], "curve": []}
    rates: dict[str, list[float]] = {"tcp": [], "curve": []}
    with contextlib.ExitStack() as stack:
        for name, flags in (("tcp", ["--insecure"]), ("curve", ["--keys", keys_dir])):
            front, back = f"tcp://127.0.0.1:{_port()}", f"tcp://127.0.0.1:{_port()}"
            admin = f"ipc://{os.path.dirname(keys_dir)}/admin-{name}"  # one broker's own
            stack.callback(stop, spawn("broker", ["--frontend", front, "--backend", back,
                                                  "--admin", admin, *flags,
                                                  "--log-level", "WARNING"]))
            stack.callback(stop, _worker(back, 1.0, tuple(flags)))
            s = socks[name] = ctx.socket(zmq.DEALER)
            stack.callback(s.close, 0)
            if name == "curve":
                curve_client(s, PeerKeys.load(keys_dir, "bench"))
            s.connect(front)
            _wait_connected(s, [])
        for _ in range(rounds):
            for name, s in socks.items():
                r, rate = _measure(s, [], rtt_n // rounds, tput_n // rounds, inflight, bar)
                rtts[name].append(r)
                rates[name].append(rate)
    for name in socks:
        out[f"{name}_rtt_us_p50"] = percentile([x for r in rtts[name] for x in r], 50)
        out[f"{name}_rtt_us_p99"] = percentile([x for r in rtts[name] for x in r], 99)
        out[f"{name}_msgs_per_s"] = statistics.median(rates[name])
    # ratios round by round (each pair ran back to back), then their median
    pairs = list(zip(rtts["curve"], rtts["tcp"], rates["curve"], rates["tcp"], strict=True))
    out["curve_over_tcp_rtt_p50"] = statistics.median(
        percentile(c, 50) / percentile(t, 50) for c, t, _, _ in pairs)
    out["curve_over_tcp_msgs"] = statistics.median(c / t for _, _, c, t in pairs)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proxy(front: zmq.Socket, back: zmq.Socket) -> None:
    try:
        zmq.proxy(front, back)
    except (zmq.ContextTerminated, zmq.ZMQError):
        pass
    finally:
        front.close(0)
        back.close(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zeroserve bench transport", description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rtt-requests", type=int, default=3000)
    ap.add_argument("--throughput-requests", type=int, default=30000)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--curve", action="store_true", help="also: tcp open vs tcp with CURVE")
    args = ap.parse_args(argv)
    res = run(args.rtt_requests, args.throughput_requests, args.inflight, args.curve)
    report(res, args.json, "zeroserve bench transport (100-byte request, one-chunk reply)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
