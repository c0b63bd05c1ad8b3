"""Prometheus metrics of one server, in its own registry (served at GET /metrics).

Engine state (running and waiting sequences, KV cache use, prefix cache hit rate, token counters)
is read from the Executor at scrape time; request latencies are observed as requests finish.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kiln.runtime.executor import Executor
from kiln.runtime.request import Result

# Seconds, from sub-millisecond decode steps on a GPU to minutes-long generations.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0)
TOKEN_COUNTERS = {
    "prompt_tokens": "prompt tokens of accepted requests",
    "generation_tokens": "generated tokens",
}


class _EngineCollector:
    def __init__(self, executor: Executor):
        self.executor = executor

    def collect(self):
        ex, pool = self.executor, self.executor.pool
        gauges = [
            ("kiln_num_requests_running", "sequences in the running batch (a request with n choices counts n)",
             ex.num_running),
            ("kiln_num_requests_waiting", "sequences waiting to be scheduled", ex.num_waiting),
            ("kiln_kv_cache_usage_ratio", "fraction of KV cache blocks in use", pool.num_used_blocks / pool.num_blocks),
            ("kiln_kv_cache_used_blocks", "KV cache blocks in use", pool.num_used_blocks),
            ("kiln_kv_cache_total_blocks", "KV cache blocks in the pool", pool.num_blocks),
            ("kiln_prefix_cache_hit_rate", "fraction of looked-up prompt tokens found in the prefix cache",
             pool.hit_rate),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        for key, doc in TOKEN_COUNTERS.items():
            yield CounterMetricFamily(f"kiln_{key}", doc, value=ex.counters[key])


class ServerMetrics:
    def __init__(self, executor: Executor):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(executor))
        self.finished = Counter("kiln_request_finished", "choices that ended, by finish reason (a request that "
                                "failed counts once as error)", ["finish_reason"], registry=self.registry)
        self.overloaded = Counter("kiln_request_overloaded", "requests refused with 429 by --max-queue-size",
                                  registry=self.registry)
        histograms = {
            "time_to_first_token": "arrival to first generated token",
            "inter_token_latency": "mean time between a request's generated tokens after the first",
            "e2e_request_latency": "arrival to the last token",
            "request_queue_time": "arrival to the first iteration that ran the request",
        }
        self.latency = {name: Histogram(f"kiln_{name}_seconds", doc, buckets=LATENCY_BUCKETS, registry=self.registry)
                        for name, doc in histograms.items()}

    def observe_error(self) -> None:
        self.finished.labels("error").inc()

    def observe_finished(self, result: Result, num_output_tokens: list[int]) -> None:
        """``result`` is a request's final one; ``num_output_tokens`` counts each choice's tokens."""
        for reason in result.finish_reasons:
            self.finished.labels(reason).inc()
        if result.schedule_time is not None:
            self.latency["request_queue_time"].observe(result.schedule_time - result.arrival_time)
        if result.finish_time is not None:
            self.latency["e2e_request_latency"].observe(result.finish_time - result.arrival_time)
        if result.first_token_time is None:
            return
        self.latency["time_to_first_token"].observe(result.first_token_time - result.arrival_time)
        most_tokens = max(num_output_tokens, default=0)
        if result.finish_time is not None and most_tokens > 1:
            self.latency["inter_token_latency"].observe((result.finish_time - result.first_token_time)
                                                        / (most_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
