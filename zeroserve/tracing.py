"""OpenTelemetry traces across the pipeline's processes; off unless asked for.

On in a process when its environment asks (the standard variables, so supervisord and
`zeroserve up` pass them down): OTEL_TRACES_EXPORTER=otlp (OTEL_EXPORTER_OTLP_ENDPOINT; needs
opentelemetry-exporter-otlp-proto-http installed) or console, or ZEROSERVE_TRACE_FILE=PATH
(one JSON span per line; "{service}" and "{pid}" in PATH are filled in). Off, `setup` returns
at once and every helper at its first line: no span is made and nothing is added to a message.

The trace context travels in a REQUEST's header as "trace", a W3C traceparent
(00-<trace id>-<parent span id>-<flags>). Spans, all in one trace:
  gateway  "<METHOD> <route>" (server kind; a client's `traceparent` header is honoured),
           and under it "gateway.stream" (first token to the end)
  broker   "broker.queue" (arrival to dispatch), under the gateway's span
  worker   "worker.request" under the gateway's span, and under it "worker.queue" (waiting
           for a seat), "worker.prefill" (to the first token), "worker.decode" (to the end)
Spans are recorded when their work is over, with the times it happened (start_ns, end_ns).
"""

from __future__ import annotations

import atexit
import os
import time
from typing import Any

_tracer: Any = None


def setup(service: str) -> None:
    """Install a tracer for this process if its environment asks for one."""
    global _tracer
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    path = os.environ.get("ZEROSERVE_TRACE_FILE", "")
    if exporter not in ("otlp", "console") and not path:
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
    )

    name = os.environ.get("OTEL_SERVICE_NAME") or f"zeroserve-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if path:
        out = open(path.format(service=service, pid=os.getpid()), "a", buffering=1)  # noqa: SIM115
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(
            out=out, formatter=lambda span: span.to_json(indent=None) + "\n"),
            schedule_delay_millis=200))  # written off the request path, within 0.2 s
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise SystemExit("OTEL_TRACES_EXPORTER=otlp needs opentelemetry-exporter-otlp-"
                             "proto-http: pip install it, or unset the variable") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    atexit.register(provider.shutdown)
    _tracer = provider.get_tracer("zeroserve")


def enabled() -> bool:
    return _tracer is not None


def now_ns() -> int:
    return time.time_ns()


def _context(traceparent: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def traceparent(span: Any) -> str:
    """The W3C traceparent that makes `span` the parent of what it is sent with."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def start(name: str, parent: str = "", start_ns: int | None = None, server: bool = False,
          **attrs: Any) -> Any:
    """A span under the traceparent `parent` (a new trace without one); None when off.
    The caller ends it (`end`)."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    span = _tracer.start_span(name, context=_context(parent) if parent else None,
                              kind=SpanKind.SERVER if server else SpanKind.INTERNAL,
                              start_time=start_ns)
    if attrs:
        span.set_attributes(attrs)
    return span


def end(span: Any, end_ns: int | None = None, **attrs: Any) -> None:
    if span is None:
        return
    if attrs:
        span.set_attributes({k: v for k, v in attrs.items() if v is not None})
    span.end(end_time=end_ns)


def record(name: str, parent: str, start_ns: int, end_ns: int, **attrs: Any) -> str:
    """A span whose work is over; returns its traceparent (for children), "" when off."""
    span = start(name, parent, start_ns, **attrs)
    if span is None:
        return ""
    end(span, end_ns)
    return traceparent(span)


def worker_spans(parent: str, arrived: int, first: int, finish: dict[str, Any] | None,
                 worker_id: str) -> None:
    """A finished request's worker spans: worker.request, and under it worker.queue (to its
    seat, from the END's queue_ms), worker.prefill (to the first token), worker.decode."""
    now = now_ns()
    finish = finish or {}
    request = record("worker.request", parent, arrived, now, worker=worker_id,
                     finish=finish.get("finish_reason") or "error",
                     tokens=(finish.get("usage") or {}).get("completion_tokens", 0))
    seated = min(now, arrived + int(finish.get("queue_ms", 0) * 1e6))
    record("worker.queue", request, arrived, seated)
    if first:
        record("worker.prefill", request, seated, first)
        record("worker.decode", request, first, now)
