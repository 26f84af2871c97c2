"""Prometheus metrics: per-request counters and histograms, engine gauges read
from the engine loop's latest snapshot at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tidal.engine.loop import EngineLoop
from tidal.engine.request import Request

disable_created_metrics()  # no *_created series: they only add noise here

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop

    def collect(self) -> Iterator[Metric]:
        snap = self.loop.snapshot
        yield GaugeMetricFamily("tidal_queue_length", "Requests waiting for the engine", value=self.loop.queue_length())
        yield GaugeMetricFamily("tidal_running_requests", "Requests in the running batch", value=snap["running"])
        yield GaugeMetricFamily("tidal_kv_pages_total", "KV cache pages (one token each)", value=snap["capacity"])
        yield GaugeMetricFamily("tidal_kv_pages_used", "KV pages held by requests or the prefix cache", value=snap["capacity"] - snap["free"])
        yield GaugeMetricFamily("tidal_kv_pages_cached", "KV pages held by the prefix cache", value=snap["cached"])
        looked = snap["cache_lookup_positions"]
        rate = snap["cache_hit_positions"] / looked if looked else 0.0
        yield GaugeMetricFamily("tidal_prefix_cache_hit_rate", "Prompt positions served from the prefix cache / looked up", value=rate)
        yield CounterMetricFamily("tidal_engine_steps", "Engine steps run", value=snap["steps"])
        yield CounterMetricFamily("tidal_preemptions", "Requests preempted to free KV pages", value=snap["preemptions"])


class Metrics:
    def __init__(self, loop: EngineLoop) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tidal_requests", "Requests by skill and outcome", ["skill", "status"], registry=r)
        self.prompt_tokens = Counter("tidal_prompt_tokens", "Prompt positions (image positions included)", registry=r)
        self.cached_tokens = Counter("tidal_prompt_tokens_cached", "Prompt positions served by the prefix cache", registry=r)
        self.generated_tokens = Counter("tidal_generated_tokens", "Tokens generated (objects for detect/point)", registry=r)
        self.ttft = Histogram("tidal_time_to_first_token_seconds", "Arrival to first output", ["skill"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("tidal_request_latency_seconds", "Arrival to finish", ["skill"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prepare = Histogram(
            "tidal_request_prepare_seconds", "Accepted to in the engine's queue: validation, image decoding and hashing, prompt", ["skill"], buckets=_LATENCY_BUCKETS, registry=r
        )
        r.register(_EngineCollector(loop))

    def rejected(self, skill: str, status: str) -> None:
        self.requests.labels(skill, status).inc()

    def finished(self, req: Request, skill: str, status: str) -> None:
        self.requests.labels(skill, status).inc()
        self.prompt_tokens.inc(req.prompt_tokens)
        self.cached_tokens.inc(req.cached_prompt_tokens)
        self.generated_tokens.inc(req.skill.completion_tokens)
        if req.first_output_at is not None:
            self.ttft.labels(skill).observe(req.first_output_at - req.arrival)
        if req.finished_at is not None:
            self.latency.labels(skill).observe(req.finished_at - req.arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)
