"""The server's operational signals: Prometheus metrics (GET /metrics) and the one-line access log.

`Metrics` owns a `CollectorRegistry` of its own (one per app, so two apps in one process -- the tests -- never
share or collide on metric names). Counters and histograms are fed from two places: the access-log middleware
(requests by adapter and status) and the engine's `on_finish` hook (tokens, time to first token, time per output
token). Gauges that mirror live state (queue depth, running batch, adapters resident, registry loads/evictions)
are read at scrape time by a collector, so nothing has to remember to update them and registry.py stays as is.

The access log is one line per request, written when its response (a stream too) has ended: adapter, status,
tokens and latency, as `key=value` text or as a JSON object (`serve --log-format json`), on logger
`llama_adapter.access`. Its per-request record lives in a context variable that the middleware sets, so the
`Server` can fill in the adapter and the token counts without the routes passing it around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llama_adapter.serving.engine import Engine
    from llama_adapter.serving.registry import AdapterRegistry

access_log = logging.getLogger("llama_adapter.access")
LOG_FORMATS = ("text", "json")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


@dataclass
class AccessRecord:
    """What one request's access-log line says; `adapter` and tokens are filled in while it is served."""

    method: str
    path: str
    adapter: str | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


current_access: contextvars.ContextVar[AccessRecord | None] = contextvars.ContextVar("access_record", default=None)


def note_model(name: str) -> None:
    """Record the requested model (adapter or base) on the current request's access record, if there is one."""
    rec = current_access.get()
    if rec is not None:
        rec.adapter = name


class _LiveState(Collector):
    """Gauges read from the engine and the adapter registry when scraped (never stale, nothing to update)."""

    def __init__(self, engine: Engine, registry: AdapterRegistry) -> None:
        self.engine, self.registry = engine, registry

    def collect(self) -> Iterator[Metric]:
        e, r = self.engine, self.registry
        yield GaugeMetricFamily("llama_adapter_queue_depth", "requests waiting for a batch slot", value=e.queued)
        yield GaugeMetricFamily("llama_adapter_running_batch_size", "requests decoding now", value=e.running)
        yield GaugeMetricFamily(
            "llama_adapter_adapters_resident", "adapters loaded on the model", value=len(e.model.adapters)
        )
        yield CounterMetricFamily("llama_adapter_adapter_loads", "adapter files loaded", value=r.loads)
        yield CounterMetricFamily("llama_adapter_adapter_evictions", "adapters evicted (LRU)", value=r.evictions)


class Metrics:
    """The app's Prometheus registry and the metrics fed by the middleware and the engine."""

    def __init__(self, engine: Engine, registry: AdapterRegistry) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llama_adapter_requests", "HTTP requests by model and status", ["adapter", "status"], registry=r
        )
        self.prompt_tokens = Counter("llama_adapter_prompt_tokens", "prompt tokens decoded", ["adapter"], registry=r)
        self.generated_tokens = Counter("llama_adapter_generated_tokens", "tokens generated", ["adapter"], registry=r)
        self.ttft = Histogram(
            "llama_adapter_time_to_first_token_seconds",
            "from queueing a sequence to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "llama_adapter_time_per_output_token_seconds",
            "mean time between a sequence's generated tokens after the first",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_LiveState(engine, registry))

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_finish(self, adapter: str | None, prompt_tokens: int, generated: int, per_token_s: float | None) -> None:
        """A sequence left the engine (called from the engine thread; prometheus_client is thread-safe)."""
        name = adapter or "base"
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        self.generated_tokens.labels(name).inc(generated)
        if per_token_s is not None:
            self.tpot.observe(per_token_s)


def format_access(rec: AccessRecord, latency_s: float, fmt: str) -> str:
    """The access-log line: JSON (ensure_ascii, so a client's odd characters cannot break the line) or text."""
    fields = {
        "method": rec.method,
        "path": rec.path,
        "adapter": rec.adapter,
        "status": rec.status,
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "latency_ms": round(latency_s * 1000, 1),
    }
    if fmt == "json":
        return json.dumps(fields, ensure_ascii=True)
    return " ".join(f"{k}={json.dumps(v, ensure_ascii=True) if isinstance(v, str) else v}" for k, v in fields.items())


class AccessMiddleware:
    """Pure ASGI middleware (it runs in the route's own task, so the context variable reaches the route): one
    access-log line and one `requests` count per HTTP request, after its response has been sent in full."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log_format: str = "text") -> None:
        self.app, self.metrics, self.log_format = app, metrics, log_format

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rec = AccessRecord(scope.get("method", ""), scope.get("path", ""))
        token = current_access.set(rec)
        start = time.perf_counter()

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                rec.status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:
            rec.status = rec.status or 500
            raise
        finally:
            current_access.reset(token)
            if rec.path != "/metrics":
                self.metrics.requests.labels(rec.adapter or "-", str(rec.status)).inc()
            access_log.info(format_access(rec, time.perf_counter() - start, self.log_format))
