"""Prometheus metrics for the whole pipeline, read at the gateway's /metrics.

The gateway's own figures (requests, latencies by model, cache) are counted as they happen;
the workers' and broker's come from the broker's worker table, which heartbeats keep fresh:
nothing else needs scraping. From the table: pipeline-wide gauges (running, waiting, batch
size, KV cache use, workers up) and, per worker (labels worker, model), the engine's own
figures: zeroserve_worker_* (WorkerFamilies below).

With --metrics-vllm-names the same figures are also exported under vLLM's names, label
`model` as `model_name`, so dashboards built for vLLM work unchanged (VLLM_NAMES is the
mapping, also in the README).

Several gateway processes (--workers N) export one set of figures: cli.py gives them a shared
PROMETHEUS_MULTIPROC_DIR, counters and histograms add up across the processes, and gauges
(the same table, polled by each) show the most recent value; whichever process a scrape
reaches answers the same.

Tenants: a key that is not an admin's sees no prefix-cache figure (a hit counter that moves
when a guess is right tells one tenant what another sent). Per-worker series are kept for at
most MAX_WORKER_SERIES workers, with bounded labels, so registrations cannot flood a scrape.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import Gauge as _Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.samples import Sample

from zeroserve import protocol as p

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set: several gateway processes share the figures
Gauge = partial(_Gauge, multiprocess_mode="mostrecent")  # each process polls the same table
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
MAX_WORKER_SERIES = 256  # workers with per-worker series (the first by worker id)
MAX_LABEL_CHARS = 128


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("zeroserve_requests", "HTTP requests", ["route", "status"],
                                registry=r)
        self.ttft = Histogram("zeroserve_time_to_first_token_seconds", "TTFT", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("zeroserve_inter_token_latency_seconds", "Between streamed chunks",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("zeroserve_request_duration_seconds", "End-to-end latency",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("zeroserve_queue_time_seconds", "Time waiting in the worker",
                               ["model", "priority"], buckets=LATENCY_BUCKETS, registry=r)
        self.late = Counter("zeroserve_deadline_misses", "Requests past their deadline: "
                            "queued (failed, 504) or running (ended with what they made)",
                            ["model", "priority", "stage"], registry=r)
        self.cache = Counter("zeroserve_cache_lookups", "Response cache", ["result"], registry=r)
        self.tokens = Counter("zeroserve_tokens", "Tokens", ["kind"], registry=r)
        self.workers_up = Gauge("zeroserve_workers_up", "Live workers", registry=r)
        self.running = Gauge("zeroserve_running_requests", "Requests in running batches",
                             registry=r)
        self.waiting = Gauge("zeroserve_waiting_requests", "Queued in broker and workers",
                             registry=r)
        self.batch = Gauge("zeroserve_batch_size", "Latest step batch size, summed over workers",
                           registry=r)
        self.kv = Gauge("zeroserve_kv_cache_usage_ratio", "KV cache blocks in use / total",
                        registry=r)
        self.kv_tokens_used = Gauge("zeroserve_kv_cache_used_tokens",
                                    "KV cache tokens held by sequences (whole blocks)", registry=r)
        self.kv_tokens = Gauge("zeroserve_kv_cache_capacity_tokens", "KV cache size in tokens",
                               registry=r)
        self.prefix_hit = Gauge("zeroserve_prefix_cache_hit_ratio",
                                "Prompt tokens served from the prefix cache / prompt tokens",
                                registry=r)
        self.preemptions = Gauge("zeroserve_preemptions",
                                 "Sequences preempted for KV blocks since the workers started",
                                 registry=r)

        self.routed = Gauge("zeroserve_routed_requests", "Generations the broker routed by "
                            "prefix since it started: to their prefix's worker (affinity), "
                            "past it for load (spilled), or with no match (cold)",
                            ["decision"], registry=r)

        self.table: dict[str, Any] = {"workers": []}
        self.scraped = r  # what /metrics reads: this process's figures, or every process's
        if os.environ.get(MULTIPROC_DIR):
            from prometheus_client import multiprocess

            self.scraped = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.scraped)
        self.scraped.register(WorkerFamilies(self))  # from the table: the same in each process

    def exposition(self, vllm_names: bool = False, tenant_safe: bool = False) -> bytes:
        """The /metrics body; with vllm_names, the mapped families follow under vLLM's names;
        tenant_safe leaves out the prefix-cache families."""
        source: Any = TenantSafe(self.scraped) if tenant_safe else self.scraped
        text = generate_latest(source)
        if vllm_names:
            text += generate_latest(VllmNames(source))  # type: ignore[arg-type]
        return text

    def update_from_table(self, table: dict[str, Any]) -> None:
        self.table = table
        workers = table.get("workers", [])
        stats = [w.get("stats") or {} for w in workers]
        self.workers_up.set(len(workers))
        self.running.set(sum(s.get("running", 0) for s in stats))
        self.waiting.set(sum(s.get("waiting", 0) for s in stats) + table.get("queued", 0))
        self.batch.set(sum(s.get("batch_size", 0) for s in stats))
        used = sum(s.get("kv_blocks_used", 0) for s in stats)
        total = sum(s.get("kv_blocks", 0) for s in stats)
        self.kv.set(used / total if total else 0.0)
        self.kv_tokens_used.set(sum(s.get("kv_tokens_used", 0) for s in stats))
        self.kv_tokens.set(sum(s.get("kv_tokens", 0) for s in stats))
        hits = sum(s.get("prefix_cache_hit_tokens", 0) for s in stats)
        queried = sum(s.get("prefix_cache_queried_tokens", 0) for s in stats)
        self.prefix_hit.set(hits / queried if queried else 0.0)
        self.preemptions.set(sum(s.get("preemptions", 0) for s in stats))
        for decision, n in (table.get("routed") or {}).items():
            self.routed.labels(decision).set(n)


def _worker_families(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per worker, from the stats its heartbeats carry (an LLM engine's; others have fewer)."""
    labels = ["worker", "model"]
    gauges = {"running": ("zeroserve_worker_running_requests", "Sequences in its batch"),
              "waiting": ("zeroserve_worker_waiting_requests", "Sequences waiting for a seat"),
              "kv_usage": ("zeroserve_worker_kv_cache_usage_ratio", "KV blocks in use / total"),
              "batch_size": ("zeroserve_worker_batch_size", "Sequences in its latest step"),
              "step_tokens": ("zeroserve_worker_step_tokens", "Tokens in its latest step")}
    counters = {
        "steps": ("zeroserve_worker_steps", "Engine steps"),
        "prompt_tokens": ("zeroserve_worker_prompt_tokens", "Prompt tokens of requests added"),
        "generated_tokens": ("zeroserve_worker_generation_tokens", "Tokens generated"),
        "prefill_tokens": ("zeroserve_worker_prefill_tokens", "Prompt tokens computed"),
        "decode_tokens": ("zeroserve_worker_decode_tokens", "Single-token decode rows"),
        "busy_s": ("zeroserve_worker_busy_seconds", "Time spent in engine steps"),
        "preemptions": ("zeroserve_worker_preemptions", "Sequences preempted for KV blocks"),
        "prefix_cache_queried_tokens": ("zeroserve_worker_prefix_cache_queries_tokens",
                                        "Prompt tokens looked up in the prefix cache"),
        "prefix_cache_hit_tokens": ("zeroserve_worker_prefix_cache_hits_tokens",
                                    "Prompt tokens found in the prefix cache")}
    out: dict[str, Metric] = {}
    for key, (name, doc) in gauges.items():
        out[key] = GaugeMetricFamily(name, doc, labels=labels)
    for key, (name, doc) in counters.items():
        out[key] = CounterMetricFamily(name, doc, labels=labels)
    steps = HistogramMetricFamily("zeroserve_worker_step_seconds", "Engine step time",
                                  labels=labels)
    for w in sorted(workers, key=lambda w: str(w.get("worker_id", "")))[:MAX_WORKER_SERIES]:
        stats = w.get("stats") or {}
        values = [str(w.get("worker_id", ""))[:MAX_LABEL_CHARS],
                  ",".join(map(str, w.get("models") or []))[:MAX_LABEL_CHARS]]
        for key, family in out.items():
            if isinstance(stats.get(key), int | float):
                family.add_metric(values, stats[key])
        buckets = stats.get("step_s_buckets")
        if isinstance(buckets, list) and len(buckets) == len(p.STEP_BUCKETS_S) + 1:
            bounds = [*map(str, p.STEP_BUCKETS_S), "+Inf"]
            running = [sum(buckets[:i + 1]) for i in range(len(buckets))]
            steps.add_metric(values, list(zip(bounds, running, strict=True)),
                             stats.get("busy_s", 0.0))
    yield from out.values()
    yield steps


def priority_label(priority: int) -> str:
    """A request's priority as a label: its value within [-10, 10], else which side."""
    return str(priority) if -10 <= priority <= 10 else ("<-10" if priority < 0 else ">10")


class WorkerFamilies:
    """A collector: the per-worker families, read from the latest table at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from _worker_families(self.metrics.table.get("workers", []))


# zeroserve family -> vLLM's names for it (v1 and, where it renamed one, the older name)
VLLM_NAMES = {
    "zeroserve_time_to_first_token_seconds": ["vllm:time_to_first_token_seconds"],
    "zeroserve_inter_token_latency_seconds": ["vllm:inter_token_latency_seconds",
                                              "vllm:time_per_output_token_seconds"],
    "zeroserve_request_duration_seconds": ["vllm:e2e_request_latency_seconds"],
    "zeroserve_queue_time_seconds": ["vllm:request_queue_time_seconds"],
    "zeroserve_worker_running_requests": ["vllm:num_requests_running"],
    "zeroserve_worker_waiting_requests": ["vllm:num_requests_waiting"],
    "zeroserve_worker_kv_cache_usage_ratio": ["vllm:kv_cache_usage_perc",
                                              "vllm:gpu_cache_usage_perc"],
    "zeroserve_worker_prompt_tokens": ["vllm:prompt_tokens"],
    "zeroserve_worker_generation_tokens": ["vllm:generation_tokens"],
    "zeroserve_worker_preemptions": ["vllm:num_preemptions"],
    "zeroserve_worker_prefix_cache_queries_tokens": ["vllm:prefix_cache_queries"],
    "zeroserve_worker_prefix_cache_hits_tokens": ["vllm:prefix_cache_hits"],
}


class TenantSafe:
    """A registry's families but those about the prefix cache."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        return (f for f in self.source.collect() if "prefix_cache" not in f.name)


class VllmNames:
    """The mapped families of a registry under vLLM's names (label model -> model_name)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            for name in VLLM_NAMES.get(family.name, []):
                renamed = Metric(name, family.documentation, family.type, family.unit)
                renamed.samples = [
                    Sample(name + s.name[len(family.name):],
                           {("model_name" if k == "model" else k): v
                            for k, v in s.labels.items()}, s.value, s.timestamp, s.exemplar)
                    for s in family.samples]
                yield renamed
