"""Configuration: frozen dataclasses built once per process, plus default endpoints.

Nothing here binds or connects. Endpoints default to ipc paths in the deployment's private
runtime directory, named after its instance (``ZEROSERVE_INSTANCE``, default "default"), so two
deployments on one host never collide and no other user can reach or squat them (never in a
world-writable /tmp); any endpoint can be a tcp:// address instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from zeroserve.flags import knob

MIB = 1024 * 1024
# What one request may ask for: the engines and the gateway check the same numbers.
MAX_PROMPT_CHARS = 4 * MIB  # a prompt, or all of a chat's messages together
MAX_TOKENIZE_TOKENS = 1 << 18  # ids in one /tokenize answer: beyond it a 400
MAX_EMBED_INPUTS = 2048  # texts in one embeddings request (OpenAI's limit)
MAX_EMBED_TEXT_CHARS = 100_000


def instance_name() -> str:
    return os.environ.get("ZEROSERVE_INSTANCE", "default")


def runtime_dir(instance: str | None = None) -> str:
    """The deployment's private directory for ipc endpoints (mode 0700, the user's own):
    $XDG_RUNTIME_DIR/zeroserve/<instance>, else ~/.zeroserve/run/<instance>."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    root = (os.path.join(base, "zeroserve") if base
            else os.path.join(os.path.expanduser("~"), ".zeroserve", "run"))
    return os.path.join(root, instance or instance_name())


def default_endpoint(role: str, instance: str | None = None) -> str:
    """ipc endpoint for a role ("frontend", "backend" or "admin") of one deployment."""
    return f"ipc://{runtime_dir(instance)}/{role}.sock"


@dataclass(frozen=True)
class SocketConfig:
    """Options set on every socket before bind/connect (later settings do not apply)."""

    hwm: int = 100_000
    max_message_bytes: int = 64 * MIB  # one whole message, all its frames together
    linger_ms: int = 0
    curve: Any = None  # keys.PeerKeys: connect with CURVE (a client, worker or gateway)
    insecure: bool = False  # allow tcp without CURVE (one warning)


@dataclass(frozen=True)
class BrokerConfig:
    frontend: str
    backend: str
    admin: str  # state-changing ADMIN ops are accepted only here
    heartbeat_interval_s: float = knob(1.0, "seconds between heartbeats both ways")
    heartbeat_liveness: int = knob(3, "heartbeats missed before a peer is presumed dead")
    max_queue: int = knob(1024, "jobs waiting, in all")
    max_queue_bytes: int = 256 * MIB
    max_queue_wait_ms: int = knob(30_000, "longest a job waits for a worker: then BUSY")
    client_share: float = knob(0.75, "fraction of the queue (jobs and bytes) one client may "
                                     "hold")
    tenant_share: float = knob(0.25, "fraction of the queue one tenant (API key) of a client "
                                     "may hold")
    client_backlog: int = knob(10_000, "replies owed to a slow client beyond its socket's "
                                       "hwm before its requests are cancelled")
    routing: str = knob("prefix", "prefix: to the worker that was sent the request's longest "
                                  "prefix (its cache has it) unless loaded past "
                                  "--affinity-slack; least-loaded: most free credit")
    affinity_slack: float = knob(0.25, "a prefix's worker keeps it while it has at most this "
                                       "fraction of its capacity more in flight than the "
                                       "least loaded worker")
    prefix_index_entries: int = knob(100_000, "prefix hashes the broker remembers, least "
                                              "recently used dropped first")
    keys_dir: str = ""  # CURVE on both sockets, peers admitted by role (keys.py)
    key_name: str = "broker"
    sockets: SocketConfig = SocketConfig()

    @property
    def expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness


@dataclass(frozen=True)
class EchoConfig:
    """The echo engine (workers/echo.py): a test and benchmark peer."""

    name: ClassVar[str] = "echo"
    step_delay_ms: float = knob(0.0, "echo engine: delay each step")


@dataclass(frozen=True)
class LLMConfig:
    """The LLM engine (workers/llm/): its batch, context and KV cache."""

    name: ClassVar[str] = "llm"
    max_num_seqs: int = knob(64, "llm: sequences in one batch")
    max_batched_tokens: int = knob(2048, "llm: tokens one step computes (prompt chunks and "
                                         "decodes)")
    max_model_len: int = knob(2048, "llm: longest prompt + output")
    kv_cache_tokens: int = knob(0, "llm: KV cache size in tokens (0: from free memory)")
    block_size: int = knob(16, "llm: tokens per KV block")
    prefix_caching: bool = knob(True, "llm: reuse cached KV blocks of shared prompt prefixes")
    prepack: bool = knob(True, "llm on CPU in bfloat16: pack Linear weights for oneDNN once at "
                               "load (workers/llm/prepack.py; the same bits, a faster step)")
    compile: bool | None = knob(None, "llm: decode attention compiled by inductor, reading "
                                      "the KV blocks in place (workers/llm/paged_decode.py); "
                                      "default: on for CPU, where it measured faster")
    check_blocks: bool = knob(False, "llm debug: assert the KV block accounting after every "
                                     "step")
    scheduling: str = knob("priority", "llm: priority (lower `priority` first, as vLLM; the "
                                       "least urgent preempted first) or fcfs (arrival order)")

    def compiles(self, device_type: str) -> bool:
        """--compile as given, else on where it measured faster: CPU (on CUDA the GPU check
        compares the two; until it has, uncompiled)."""
        return self.compile if self.compile is not None else device_type == "cpu"


@dataclass(frozen=True)
class BatchConfig:
    """The tensor and embedding engines: requests gathered into one forward."""

    name: ClassVar[str] = "batch"
    max_batch_size: int = knob(64, "tensor/embed: requests in one forward")
    max_queue_delay_ms: float = knob(2.0, "tensor/embed: longest a request waits for a batch")


@dataclass(frozen=True)
class TensorConfig(BatchConfig):
    name: ClassVar[str] = "tensor"
    module: str = knob("", "tensor engine: pkg.mod:factory")


@dataclass(frozen=True)
class EmbedConfig(BatchConfig):
    name: ClassVar[str] = "embed"


EngineConfig = EchoConfig | LLMConfig | TensorConfig | EmbedConfig
ENGINES: dict[str, type[EngineConfig]] = {
    c.name: c for c in (EchoConfig, LLMConfig, TensorConfig, EmbedConfig)}


@dataclass(frozen=True)
class WorkerConfig:
    """One worker: what every engine shares, and its engine's own config (`engine.name`)."""

    broker: str
    engine: EngineConfig = EchoConfig()
    model: str = knob("echo", "model directory or preset name")
    served_name: str = knob("", "name requests use (default: the model's)")
    worker_id: str = knob("", "name in the broker's table (default: host-pid)")
    capacity: int = knob(64, "most requests in flight")
    cpus: tuple[int, ...] = ()
    device: str = knob("cpu", "cpu, cuda (cuda:<slot>) or cuda:N")
    dtype: str = knob("auto", "auto, float32, bfloat16, float16")
    heartbeat_interval_s: float = knob(1.0, "seconds between heartbeats both ways")
    heartbeat_liveness: int = knob(3, "heartbeats missed before the broker is presumed dead")
    progress_timeout_s: float = knob(60.0, "exit when one engine step runs longer (a hung "
                                           "engine; 0: never)")
    coalesce: bool = knob(True, "send a step's deltas for one client as one CHUNKS message "
                                "(off: one CHUNK per request per step)")
    sockets: SocketConfig = SocketConfig()

    @property
    def expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness


@dataclass(frozen=True)
class ClientConfig:
    endpoints: tuple[str, ...]
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    timeout_s: float | None = None
    max_resends: int = 3  # failovers an unstarted request survives before UNAVAILABLE
    max_resumes: int = 2  # lost workers (or brokers) a generation survives before WORKER_LOST
    sockets: SocketConfig = SocketConfig()

    @property
    def expiry_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness


@dataclass(frozen=True)
class GatewayConfig:
    broker: str
    host: str = knob("127.0.0.1", "address to listen on")
    port: int = knob(8000, "port to listen on")
    workers: int = knob(1, "gateway processes")
    api_keys_file: str = knob("", "JSON key file (see gateway/auth.py)")
    rate_rps: float = knob(0.0, "per-key requests/s (0: off)")
    rate_tpm: float = knob(0.0, "per-key tokens/min (0: off)")
    cache_bytes: int = 64 * MIB
    cache_ttl_s: float = knob(300.0, "seconds a cached response is served")
    max_body_bytes: int = knob(8 * MIB, "largest request body: beyond it 413")
    body_mib_per_s: float = knob(64.0, "request-body MiB a second per API key (per client "
                                       "address without keys): a body past it waits, unread, "
                                       "for its turn (0: off)")
    # gateway/http.py for these six
    max_connections: int = knob(4096, "per gateway process; beyond it: 503")
    max_connections_per_client: int = knob(256, "per client address and gateway process; "
                                                "beyond it: 503 (0: no cap; behind a proxy "
                                                "every client shares its address)")
    header_timeout_s: float = knob(10.0, "a request head must arrive within it: else 408")
    max_header_bytes: int = knob(32 * 1024, "largest request head: beyond it 431")
    body_timeout_s: float = knob(60.0, "a request body must arrive within it of its head: "
                                       "else 408")
    keep_alive_s: float = knob(5.0, "an idle kept-alive connection is closed after it")
    request_timeout_s: float = knob(600.0, "longest a request may take end to end")
    table_poll_s: float = 0.5
    metrics_vllm_names: bool = knob(False, "/metrics also exports the engine figures under "
                                           "vLLM's names (gateway/metrics.py)")
    cors_origins: str = knob("", "comma-separated origins browsers may call from ('*': any; "
                                 "default: off)")
    allowed_hosts: str = knob("", "without API keys, Host names accepted besides loopback "
                                  "ones and --host (comma-separated; '*': any): a web page's "
                                  "DNS rebinding cannot reach an open gateway")
    keys_dir: str = ""  # CURVE to the broker with the keypair key_name (a client key)
    key_name: str = "gateway"
    insecure: bool = False
