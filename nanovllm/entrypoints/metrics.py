"""Prometheus metrics of the server: engine gauges read at scrape time from the stats the engine process
sent with its latest Update, and token counters and latency histograms updated as outputs reach the
event loop (what clients see)."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanovllm.engine.engine_client import EngineClient, Output

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    def __init__(self, client: EngineClient) -> None:
        self.registry = CollectorRegistry()
        gauges = {
            "num_requests_running": ("requests in the running batch", "num_running"),
            "num_requests_waiting": ("requests waiting for a place in a batch", "num_waiting"),
            "kv_blocks_used": ("KV cache blocks held by live requests", "num_blocks_used"),
            "kv_blocks_total": ("KV cache blocks in the pool", "num_blocks_total"),
        }
        for name, (doc, stat) in gauges.items():
            gauge = Gauge(f"nanovllm_{name}", doc, registry=self.registry)
            gauge.set_function(lambda stat=stat: getattr(client.stats, stat))
        self.prompt_tokens = Counter("nanovllm_prompt_tokens", "prompt tokens of accepted requests", registry=self.registry)
        self.generation_tokens = Counter("nanovllm_generation_tokens", "tokens generated", registry=self.registry)
        self.requests = Counter("nanovllm_requests", "finished requests by finish reason", ["finish_reason"], registry=self.registry)
        self.time_to_first_token = Histogram("nanovllm_time_to_first_token_seconds", "arrival to first token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("nanovllm_inter_token_latency_seconds", "time between a request's outputs, per token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Per-request timing from the request's arrival in the server."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last_token: float | None = None

    def record(self, output: Output) -> None:
        now = time.perf_counter()
        num_tokens = len(output.token_ids)
        if num_tokens:
            self.metrics.generation_tokens.inc(num_tokens)
            if self.last_token is None:
                self.metrics.time_to_first_token.observe(now - self.arrival)
            else:
                gap = (now - self.last_token) / num_tokens
                for _ in range(num_tokens):
                    self.metrics.inter_token_latency.observe(gap)
            self.last_token = now
        if output.finished:
            self.metrics.requests.labels(output.finish_reason).inc()
