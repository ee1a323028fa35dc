"""The zeroserve wire protocol: every frame is defined here, once.

A message is a list of ZeroMQ frames:

    +---------+------+-------------------+----------+-----+----------+
    | version | type | header            | buffer 0 | ... | buffer N |
    | b"ZS2"  | 1 B  | msgpack map       | raw      |     | raw      |
    +---------+------+-------------------+----------+-----+----------+

- A ROUTER sees the sender's identity frame in front of the version.
- On the broker's backend (broker <-> worker) each message also carries a *route* frame in
  front of the version: the identity of the client a request belongs to (b"" when the message
  belongs to no request). Workers echo it back, so the broker routes replies with a dict lookup
  and never re-encodes a header.
- The header is a small msgpack map: the broker reads it to route. Request bodies and reply
  payloads ride in buffer 0 as msgpack bytes the broker never unpacks; tensors ride as further
  raw buffers (or as shared-memory descriptors inside the body).

Message types and their headers (every request-scoped one carries ``id``, the request id):

    READY       worker -> broker   {worker_id, models, capacity, pid, host, cpus, device, engine}
    HEARTBEAT   both ways          {} from a client, {stats: {...}} from a worker,
                                   {epoch} from a broker
    REQUEST     client -> worker   {id, model}            buffer 0: msgpack body
    CHUNK       worker -> client   {id}                   buffer 0: msgpack payload
    CHUNKS      worker -> client   {ids: [id, ...]}       buffer 0: msgpack [payload, ...]
    END         worker -> client   {id}                   buffer 0: msgpack {finish_reason, usage}
    ERROR       any -> client      {id, code, message}
    CANCEL      client -> worker   {id}
    DRAIN       admin/broker -> worker, or worker -> broker on its own SIGTERM  {}
    DISCONNECT  either way         {reason}
    ADMIN       client -> broker   {id, op, ...}          reply: END with buffer 0 the result

A REQUEST may also carry ``tenant`` (who it is for, e.g. the gateway's API key id): the broker
gives each tenant of a client a bounded share of its queue; ``priority`` (lower first: the
broker's queue serves it so, within those shares); and ``prefix``, at most
MAX_PREFIX_HASHES short hashes of its prompt's prefixes (prefix.py), by which the broker
routes it to the worker that has that prefix cached.

CHUNKS is one engine step's deltas for several requests of one client (at most MAX_CHUNK_IDS),
in order: a worker sends one per client route per step instead of one CHUNK per request, so
the broker's cost follows steps, not tokens (it reads only the ids, to know which requests
have streamed). END and ERROR still travel alone, after it.

A broker's ``epoch`` is random per process: a client whose broker's heartbeats come back with a
new epoch knows the broker restarted and took the client's requests with it, and sends them
all again with ``again`` = 1. A broker that already runs a request (sent after the restart,
before the client noticed) ignores the copy marked ``again``; it runs the others.

Nothing here pickles. Decoding untrusted bytes always goes through ``unpackb`` with limits, and
`decode` checks a whole message before it decodes anything: its frame count, its total size,
then the type of every header field it knows (HEADER_FIELDS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from zeroserve.config import SocketConfig

VERSION = b"ZS2"  # ZS2: CHUNKS, prefix hashes, broker epochs

READY = b"\x01"
HEARTBEAT = b"\x02"
REQUEST = b"\x03"
CHUNK = b"\x04"
END = b"\x05"
ERROR = b"\x06"
CANCEL = b"\x07"
DRAIN = b"\x08"
DISCONNECT = b"\x09"
ADMIN = b"\x0a"
CHUNKS = b"\x0b"

TYPE_NAMES = {
    READY: "READY",
    HEARTBEAT: "HEARTBEAT",
    REQUEST: "REQUEST",
    CHUNK: "CHUNK",
    END: "END",
    ERROR: "ERROR",
    CANCEL: "CANCEL",
    DRAIN: "DRAIN",
    DISCONNECT: "DISCONNECT",
    ADMIN: "ADMIN",
    CHUNKS: "CHUNKS",
}

# Error codes carried in ERROR headers.
BAD_REQUEST = "BAD_REQUEST"
BUSY = "BUSY"
UNKNOWN_MODEL = "UNKNOWN_MODEL"
WORKER_LOST = "WORKER_LOST"
TIMEOUT = "TIMEOUT"
CANCELLED = "CANCELLED"
INTERNAL = "INTERNAL"
UNAVAILABLE = "UNAVAILABLE"
SHM_UNREACHABLE = "SHM_UNREACHABLE"  # the worker cannot map the sender's arena: send frames
ERROR_CODES = (
    BAD_REQUEST, BUSY, UNKNOWN_MODEL, WORKER_LOST, TIMEOUT, CANCELLED, INTERNAL, UNAVAILABLE,
    SHM_UNREACHABLE,
)

# Limits for decoding untrusted msgpack: a header is small, a body may hold long prompts.
HEADER_LIMIT_BYTES = 16 * 1024
MAX_HEADER_CONTAINERS = 64  # a header is a small flat map (READY: its models and cpus lists)
BODY_LIMIT_BYTES = 64 * 1024 * 1024
MAX_ID_LEN = 128
MAX_CONTAINERS = 1 << 14  # arrays and maps in one decoded payload (a 2,000-message chat: 2k)
MAX_ITEMS = 1 << 21  # their elements together (a prompt of token ids: up to 1M)
MAX_BUFFERS = 1024  # frames after the header: the body and raw tensor buffers
MAX_MESSAGE_BYTES = SocketConfig.max_message_bytes  # all frames together (a socket's default)
MAX_NAME_LEN = 256
MAX_PREFIX_HASHES = 32  # prefix hashes in one REQUEST header (prefix.py)
MAX_HASH_BYTES = 16
MAX_CHUNK_IDS = 64  # requests in one CHUNKS: 64 ids of MAX_ID_LEN fit a header
# Header fields with a fixed type: (types, longest str); a present field of another type, or
# longer, makes the whole message malformed. Other fields are read by their users with care.
# A worker's stats: an LLM engine's step-time histogram, "step_s_buckets", counts the steps
# in each bucket of these upper bounds (seconds), the last bucket +Inf.
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

HEADER_FIELDS: dict[str, tuple[tuple[type, ...], int]] = {
    "id": ((str,), MAX_ID_LEN),
    "model": ((str,), MAX_NAME_LEN),
    "tenant": ((str,), MAX_NAME_LEN),
    "trace": ((str,), 64),  # a W3C traceparent (zeroserve/tracing.py)
    "code": ((str,), 64),
    "message": ((str,), 4096),
    "reason": ((str,), 4096),
    "op": ((str,), 64),
    "worker_id": ((str,), MAX_NAME_LEN),
    "models": ((list,), 256),
    "capacity": ((int,), 0),  # a READY's: its credit with this broker (a share of slots)
    "slots": ((int,), 0),  # a READY's: its engine's whole capacity, across its brokers
    "stats": ((dict,), 0),
    "epoch": ((str,), 32),  # a broker process's random identity (its heartbeats)
    "prefix": ((list,), MAX_PREFIX_HASHES),  # prefix.py; each bytes of <= MAX_HASH_BYTES
    "ids": ((list,), MAX_CHUNK_IDS),  # CHUNKS: each a request id
    "again": ((int,), 0),  # a REQUEST sent once more after its broker restarted
    "priority": ((int,), 0),  # a REQUEST's (lower first): the broker's queue order
    "deadline": ((float, int), 0),  # a REQUEST's, wall-clock seconds: dropped if queued past it
}
UNATTRIBUTED = "*"  # request id of an ERROR that answers a frame with no usable id


class ProtocolError(ValueError):
    """A frame that does not follow this protocol. Its text is safe to send back to the peer."""


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message: its type byte, its header map and its raw buffers."""

    type: bytes
    header: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)

    @property
    def id(self) -> str | None:
        return self.header.get("id")


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes, limit: int = BODY_LIMIT_BYTES,
            max_containers: int = MAX_CONTAINERS) -> Any:
    """Decode untrusted msgpack with every length bounded by ``limit``, the number of
    arrays and maps by `max_containers` and of their elements by MAX_ITEMS: one byte of
    msgpack is an empty list, or a one-character string in one, some 50-60 bytes of Python and
    a third of a microsecond to build, so a few MiB of them would otherwise cost hundreds of
    MiB and seconds."""
    if len(data) > limit:
        raise ProtocolError(f"msgpack payload of {len(data)} bytes exceeds {limit}")
    containers = items = 0

    def counted(obj: Any) -> Any:
        nonlocal containers, items
        containers += 1
        items += len(obj)
        if containers > max_containers:
            raise ProtocolError(f"msgpack payload holds over {max_containers} arrays and maps")
        if items > MAX_ITEMS:
            raise ProtocolError(f"msgpack payload holds over {MAX_ITEMS} items")
        return obj

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=min(limit, 1 << 20),
            max_map_len=min(limit, 1 << 16),
            max_ext_len=0,
            list_hook=counted,
            object_hook=counted,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several types on bad bytes
        raise ProtocolError(f"bad msgpack: {type(exc).__name__}") from None


def encode(msg_type: bytes, header: dict[str, Any], *buffers: bytes) -> list[bytes]:
    """The single outbound framing function: [version, type, header, *buffers]."""
    return [VERSION, msg_type, packb(header), *buffers]


def decode(frames: list[Any], max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse [version, type, header, *buffers]; raise ProtocolError on anything malformed.
    The message as a whole is bounded first: at most MAX_BUFFERS buffers and `max_bytes` in
    all (a socket's MAXMSGSIZE bounds each frame only)."""
    if not 3 <= len(frames) <= 3 + MAX_BUFFERS:
        raise ProtocolError(f"expected 3 to {3 + MAX_BUFFERS} frames, got {len(frames)}")
    size = sum(len(f) for f in frames)
    if size > max_bytes:
        raise ProtocolError(f"message of {size} bytes exceeds the {max_bytes}-byte limit")
    version, msg_type, header = frames[0], frames[1], frames[2]
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {bytes(version[:8])!r}")
    if msg_type not in TYPE_NAMES:
        raise ProtocolError(f"unknown message type {bytes(msg_type[:4])!r}")
    head = unpackb(header, HEADER_LIMIT_BYTES, MAX_HEADER_CONTAINERS)
    if not isinstance(head, dict):
        raise ProtocolError("header is not a map")
    for name, (types, longest) in HEADER_FIELDS.items():
        value = head.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            raise ProtocolError(f"header field {name!r} must be {types[0].__name__}")
        if longest and len(value) > longest:
            raise ProtocolError(f"header field {name!r} is longer than {longest}")
    if msg_type in _ID_TYPES:
        rid = head.get("id")
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_LEN:
            raise ProtocolError(f"{TYPE_NAMES[msg_type]} needs a string id of 1-{MAX_ID_LEN} chars")
    if msg_type == REQUEST and not isinstance(head.get("model"), str):
        raise ProtocolError("REQUEST needs a string model")
    if head.get("prefix") is not None and not all(
            isinstance(h, bytes) and 0 < len(h) <= MAX_HASH_BYTES for h in head["prefix"]):
        raise ProtocolError(f"header field 'prefix' must hold bytes of 1-{MAX_HASH_BYTES}")
    if msg_type == CHUNKS and not (isinstance(head.get("ids"), list) and head["ids"] and all(
            isinstance(i, str) and 0 < len(i) <= MAX_ID_LEN for i in head["ids"])):
        raise ProtocolError(f"CHUNKS needs ids: 1-{MAX_CHUNK_IDS} strings of 1-{MAX_ID_LEN}")
    return Message(msg_type, head, list(frames[3:]))


_ID_TYPES = frozenset({REQUEST, CHUNK, END, ERROR, CANCEL, ADMIN})


# Constructors for the common messages, so every caller frames them the same way.

def request(rid: str, model: str, body: dict[str, Any], *buffers: bytes,
            tenant: str = "", trace: str = "", prefix: list[bytes] | None = None) -> list[bytes]:
    """A REQUEST; the body's priority and deadline are copied into the header, for the
    broker's queue."""
    priority, deadline = body.get("priority"), body.get("deadline")
    head = {"id": rid, "model": model, **({"tenant": tenant} if tenant else {}),
            **({"trace": trace} if trace else {}), **({"prefix": prefix} if prefix else {}),
            **({"priority": priority} if isinstance(priority, int) and priority else {}),
            **({"deadline": deadline} if isinstance(deadline, float | int) else {})}
    return encode(REQUEST, head, packb(body), *buffers)


def again(frames: list[Any]) -> list[Any]:
    """A REQUEST's frames once more, marked ``again``: a broker that runs it already ignores
    this copy (after a broker restart the client cannot know which requests reached it)."""
    head = unpackb(bytes(frames[2]), HEADER_LIMIT_BYTES, MAX_HEADER_CONTAINERS)
    return [frames[0], frames[1], packb({**head, "again": 1}), *frames[3:]]


def chunk(rid: str, payload: dict[str, Any], *buffers: bytes) -> list[bytes]:
    return encode(CHUNK, {"id": rid}, packb(payload), *buffers)


def chunks(rids: list[str], payloads: list[dict[str, Any]]) -> list[bytes]:
    """Several requests' deltas in one message (one engine step's, for one client)."""
    return encode(CHUNKS, {"ids": rids}, packb(payloads))


def split_chunks(msg: Message) -> list[tuple[str, dict[str, Any]]]:
    """A CHUNKS message as (request id, payload) pairs, in order."""
    payloads = unpackb(msg.buffers[0]) if msg.buffers else None
    ids = msg.header["ids"]
    if not isinstance(payloads, list) or len(payloads) != len(ids) or not all(
            isinstance(d, dict) for d in payloads):
        raise ProtocolError("CHUNKS body must be one map per id")
    return list(zip(ids, payloads, strict=True))


def end(rid: str, payload: dict[str, Any], *buffers: bytes) -> list[bytes]:
    return encode(END, {"id": rid}, packb(payload), *buffers)


def error(rid: str, code: str, message: str) -> list[bytes]:
    limit = HEADER_FIELDS["message"][1]
    if len(message) > limit:
        message = message[:limit - 20] + "... (cut)"
    return encode(ERROR, {"id": rid, "code": code, "message": message})


def cancel(rid: str) -> list[bytes]:
    return encode(CANCEL, {"id": rid})


def admin(rid: str, op: str, **args: Any) -> list[bytes]:
    return encode(ADMIN, {"id": rid, "op": op, **args})


HEAD_FRAMES = 4  # a message's frames before its raw buffers: version, type, header, body


def materialize(frames: list[Any], n: int = HEAD_FRAMES) -> list[Any]:
    """Frames received with copy=False: the first `n` (any routing frames, then version, type,
    header, body) as bytes, the rest (raw tensor buffers) left as zero-copy zmq.Frame
    objects."""
    return [f.bytes for f in frames[:n]] + frames[n:]


def body(msg: Message) -> dict[str, Any]:
    """The msgpack body in buffer 0 of a REQUEST, CHUNK or END, as a map."""
    return decode_body(msg.buffers[0] if msg.buffers else b"")


def decode_body(raw: bytes) -> dict[str, Any]:
    """A body's raw msgpack bytes as a map ({} for none). Decoding a hostile body can cost
    milliseconds of CPU (up to MAX_CONTAINERS objects): a process's IO thread should hand the
    raw bytes on and let a worker thread decode them."""
    if not raw:
        return {}
    obj = unpackb(raw)
    if not isinstance(obj, dict):
        raise ProtocolError("body is not a map")
    return obj


def rid_of(frames: list[bytes]) -> str:
    """Best effort: the id of a message that could not be decoded, so its sender can match the
    ERROR that answers it."""
    try:
        rid = unpackb(frames[2], HEADER_LIMIT_BYTES, MAX_HEADER_CONTAINERS).get("id")
        if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LEN:
            return rid
    except Exception:
        pass
    return UNATTRIBUTED
