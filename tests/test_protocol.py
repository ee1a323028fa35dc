"""Wire protocol: golden bytes for every frame type, round trips, malformed input, no pickle."""

from __future__ import annotations

import contextlib
import pathlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zeroserve import protocol as p

GOLDEN = {
    p.READY: (
        {"worker_id": "w", "models": ["m"], "capacity": 2},
        b"\x83\xa9worker_id\xa1w\xa6models\x91\xa1m\xa8capacity\x02",
    ),
    p.HEARTBEAT: ({}, b"\x80"),
    p.REQUEST: ({"id": "r1", "model": "m"}, b"\x82\xa2id\xa2r1\xa5model\xa1m"),
    p.CHUNK: ({"id": "r1"}, b"\x81\xa2id\xa2r1"),
    p.END: ({"id": "r1"}, b"\x81\xa2id\xa2r1"),
    p.ERROR: (
        {"id": "r1", "code": "BUSY", "message": "full"},
        b"\x83\xa2id\xa2r1\xa4code\xa4BUSY\xa7message\xa4full",
    ),
    p.CANCEL: ({"id": "r1"}, b"\x81\xa2id\xa2r1"),
    p.DRAIN: ({}, b"\x80"),
    p.DISCONNECT: ({"reason": "x"}, b"\x81\xa6reason\xa1x"),
    p.ADMIN: ({"id": "a", "op": "workers"}, b"\x82\xa2id\xa1a\xa2op\xa7workers"),
    p.CHUNKS: ({"ids": ["r1", "r2"]}, b"\x81\xa3ids\x92\xa2r1\xa2r2"),
}


@pytest.mark.parametrize("msg_type", list(GOLDEN), ids=lambda t: p.TYPE_NAMES[t])
def test_golden_bytes_and_round_trip(msg_type: bytes) -> None:
    header, golden = GOLDEN[msg_type]
    frames = p.encode(msg_type, header, b"\x00raw")
    assert frames == [b"ZS2", msg_type, golden, b"\x00raw"]
    msg = p.decode(frames)
    assert msg.type == msg_type and msg.header == header and msg.buffers == [b"\x00raw"]


def test_every_type_has_a_golden_case() -> None:
    assert set(GOLDEN) == set(p.TYPE_NAMES)
    assert len(set(p.TYPE_NAMES)) == len(p.TYPE_NAMES)


def test_constructors_frame_bodies() -> None:
    frames = p.request("r", "m", {"prompt": "hi"}, b"t0")
    msg = p.decode(frames)
    assert msg.id == "r" and p.body(msg) == {"prompt": "hi"} and msg.buffers[1:] == [b"t0"]
    assert p.decode(p.error("r", p.BUSY, "x")).header["code"] == "BUSY"
    assert p.body(p.decode(p.end("r", {"finish_reason": "stop"}))) == {"finish_reason": "stop"}


@pytest.mark.parametrize("frames, why", [
    ([], "3 to"),
    ([p.VERSION, p.REQUEST], "3 to"),
    ([p.VERSION, p.HEARTBEAT, b"\x80", *[b""] * (p.MAX_BUFFERS + 1)], "3 to"),
    ([p.VERSION, p.REQUEST, p.packb({"id": "r", "model": "m", "tenant": 7})], "'tenant' must be"),
    ([p.VERSION, p.REQUEST, p.packb({"id": "r", "model": "m" * 300})], "'model' is longer"),
    ([p.VERSION, p.READY, p.packb({"capacity": "64"})], "'capacity' must be int"),
    ([p.VERSION, p.READY, p.packb({"capacity": True})], "'capacity' must be int"),
    ([p.VERSION, p.HEARTBEAT, p.packb({"stats": [1]})], "'stats' must be dict"),
    ([p.VERSION, p.HEARTBEAT, p.packb({"stats": {"a": [[]] * 70}})], "over 64 arrays and maps"),
    ([b"ZS9", p.REQUEST, b"\x80"], "version"),
    ([p.VERSION, b"\xff", b"\x80"], "unknown message type"),
    ([p.VERSION, p.REQUEST, b"\xc1"], "bad msgpack"),
    ([p.VERSION, p.REQUEST, b"\x91\x01"], "not a map"),
    ([p.VERSION, p.REQUEST, p.packb({"model": "m"})], "string id"),
    ([p.VERSION, p.REQUEST, p.packb({"id": "x" * 500, "model": "m"})], "'id' is longer"),
    ([p.VERSION, p.REQUEST, p.packb({"id": "x"})], "string model"),
    ([p.VERSION, p.CANCEL, p.packb({"id": 5})], "'id' must be str"),
    ([p.VERSION, p.HEARTBEAT, b"\xdb\xff\xff\xff\xff"], "bad msgpack"),  # str32 claims 4 GiB
    ([p.VERSION, p.HEARTBEAT, b"\x80" * (p.HEADER_LIMIT_BYTES + 1)], "exceeds"),
])
def test_malformed_frames_raise_protocol_error(frames: list[bytes], why: str) -> None:
    with pytest.raises(p.ProtocolError, match=why):
        p.decode(frames)


def test_body_must_be_a_map() -> None:
    msg = p.decode(p.encode(p.REQUEST, {"id": "r", "model": "m"}, p.packb([1, 2])))
    with pytest.raises(p.ProtocolError):
        p.body(msg)


def test_nothing_that_crosses_a_socket_is_pickled() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    pattern = re.compile(r"\bpickle\b|recv_pyobj|send_pyobj")
    offenders = []
    for pkg in ("zeroserve", "broker", "workers", "gateway"):
        for path in (root / pkg).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and "pickle-ok" not in line:
                    offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert offenders == []


def test_msgpack_bombs_are_refused_without_the_memory() -> None:
    import resource

    import msgpack

    fine = msgpack.packb({"messages": [{"role": "user", "content": "x"}] * 1000})
    assert len(p.unpackb(fine)["messages"]) == 1000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bomb = b"\xdd" + (1_000_000).to_bytes(4, "big") + b"\x90" * 1_000_000  # 1 MB of []
    with pytest.raises(p.ProtocolError, match="arrays and maps"):
        p.unpackb(bomb, 8 << 20)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 32 * 1024  # a million empty lists would be some 60 MiB


def test_a_message_is_bounded_as_a_whole_before_anything_is_decoded() -> None:
    frames = p.request("r", "m", {"prompt": "x"}, b"\0" * 600, b"\0" * 600)
    assert p.decode(frames, max_bytes=2000).id == "r"
    with pytest.raises(p.ProtocolError, match="exceeds the 1000-byte limit"):
        p.decode(frames, max_bytes=1000)  # each frame fits: only the whole is too big


def test_error_messages_are_cut_to_what_a_header_may_hold() -> None:
    msg = p.decode(p.error("r", p.INTERNAL, "x" * 100_000))
    assert len(msg.header["message"]) <= p.HEADER_FIELDS["message"][1]
    assert msg.header["message"].endswith("(cut)")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_fuzz_decode_raises_only_protocol_error(frames: list[bytes]) -> None:
    """Any bytes at all: a Message or a ProtocolError, never another exception."""
    for candidate in (frames, [p.VERSION, *frames[:1], *frames[1:]],
                      [p.VERSION, p.REQUEST, *frames]):
        try:
            msg = p.decode(candidate)
        except p.ProtocolError:
            continue
        assert isinstance(msg.header, dict)
        with contextlib.suppress(p.ProtocolError):
            p.body(msg)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(list(p.TYPE_NAMES)), st.dictionaries(
    st.sampled_from([*p.HEADER_FIELDS, "other"]), JSON, max_size=6))
def test_fuzz_headers_of_any_shape_decode_typed_or_raise(msg_type: bytes, header: dict) -> None:
    """Well-formed msgpack with fields of any type: whatever decodes has the types that
    HEADER_FIELDS promise, so no reader of a header can trip on one."""
    try:
        msg = p.decode(p.encode(msg_type, header))
    except p.ProtocolError:
        return
    for name, (types, _) in p.HEADER_FIELDS.items():
        if msg.header.get(name) is not None:
            assert isinstance(msg.header[name], types)


def test_again_marks_a_request_and_keeps_its_body_and_buffers() -> None:
    frames = p.request("r", "m", {"prompt": "x"}, b"raw", tenant="t")
    msg = p.decode(p.again(frames))
    assert msg.header == {"id": "r", "model": "m", "tenant": "t", "again": 1}
    assert p.body(msg) == {"prompt": "x"} and msg.buffers[1] == b"raw"
    with pytest.raises(p.ProtocolError, match="epoch"):
        p.decode(p.encode(p.HEARTBEAT, {"epoch": "e" * 33}))


@pytest.mark.parametrize("prefix, why", [
    ([b"12345678"] * (p.MAX_PREFIX_HASHES + 1), "longer than"),
    ([b"x" * (p.MAX_HASH_BYTES + 1)], "must hold bytes"),
    (["a string"], "must hold bytes"),
    ([b""], "must hold bytes"),
    ("not a list", "must be list"),
])
def test_hostile_prefix_hash_lists_are_refused(prefix, why) -> None:
    frames = p.encode(p.REQUEST, {"id": "r", "model": "m", "prefix": prefix}, p.packb({}))
    with pytest.raises(p.ProtocolError, match=why):
        p.decode(frames)


def test_a_request_carries_its_prefix_hashes() -> None:
    msg = p.decode(p.request("r", "m", {}, prefix=[b"12345678", b"abcdefgh"]))
    assert msg.header["prefix"] == [b"12345678", b"abcdefgh"]


def test_chunks_carry_several_requests_deltas_in_order() -> None:
    frames = p.chunks(["a", "b"], [{"text": "x"}, {"text": "y", "token_ids": [3]}])
    assert frames[2] == b"\x81\xa3ids\x92\xa1a\xa1b"
    assert p.split_chunks(p.decode(frames)) == [("a", {"text": "x"}),
                                                ("b", {"text": "y", "token_ids": [3]})]
    for bad in ([{"text": "x"}], [{"text": "x"}, 7], {"a": 1}):
        with pytest.raises(p.ProtocolError, match="one map per id"):
            p.split_chunks(p.decode(p.encode(p.CHUNKS, {"ids": ["a", "b"]}, p.packb(bad))))
    for ids in ([], ["a"] * (p.MAX_CHUNK_IDS + 1), [7], ["x" * 200]):
        with pytest.raises(p.ProtocolError):
            p.decode(p.encode(p.CHUNKS, {"ids": ids}, p.packb([])))
