"""Prometheus metrics for the whole pipeline, read at the gateway's /metrics.

The gateway's own figures (requests, latencies, cache) are counted as they happen; the
workers' and broker's (running, waiting, batch size, KV cache use, workers up) come from the
broker's worker table, which heartbeats keep fresh: nothing else needs scraping.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("zeroserve_requests", "HTTP requests", ["route", "status"],
                                registry=r)
        self.ttft = Histogram("zeroserve_time_to_first_token_seconds", "TTFT",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("zeroserve_inter_token_latency_seconds", "Between streamed chunks",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("zeroserve_request_duration_seconds", "End-to-end latency",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("zeroserve_queue_time_seconds", "Time waiting in the worker",
                               buckets=LATENCY_BUCKETS, registry=r)
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

    def update_from_table(self, table: dict[str, Any]) -> None:
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
