"""``GET /metrics``: the server's and the expert cache's counters in Prometheus' text format.

Counters and gauges are read from ``Engine.stats()`` and ``model.offload.stats()`` when Prometheus
scrapes, so they cannot drift from what the engine and the cache count themselves; only the time to
first token (a histogram, fed by the engine as each request gets its first token) and the HTTP
responses (counted by the app) are observed as they happen. Each server has its own registry.
"""

from __future__ import annotations

from .engine import Engine, Job

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """The registry ``/metrics`` renders, for ``engine`` and the model it runs (needs prometheus_client)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.ttft = Histogram("offload_moe_time_to_first_token_seconds", "Seconds from a request's arrival to its "
                              "first generated token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.responses = Counter("offload_moe_http_responses", "HTTP responses by path and status code",
                                 ["path", "status"], registry=self.registry)
        self.registry.register(_Snapshot(engine))
        engine.listeners.append(self._on_job)

    def _on_job(self, what: str, job: Job) -> None:
        if what == "first_token" and job.ttft is not None:
            self.ttft.observe(job.ttft)

    def render(self) -> tuple[bytes, str]:
        """The text Prometheus reads, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Snapshot:
    """A prometheus_client collector: the engine's and the cache's counters as they are now."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def describe(self):
        return []  # the metrics are made at each scrape; nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.engine.stats()
        requests = CounterMetricFamily("offload_moe_requests", "Requests by outcome", labels=["outcome"])
        for outcome in ("finished", "cancelled", "failed", "rejected"):
            requests.add_metric([outcome], s[outcome])
        yield requests
        yield CounterMetricFamily("offload_moe_prompt_tokens", "Prompt tokens of ended requests",
                                  value=s["prompt_tokens"])
        yield CounterMetricFamily("offload_moe_generated_tokens", "Tokens generated", value=s["completion_tokens"])
        steps = CounterMetricFamily("offload_moe_steps", "Forward passes by kind (failed: an error ended its "
                                    "requests)", labels=["kind"])
        for kind in ("prefill", "decode", "failed"):
            steps.add_metric([kind], s[f"{kind}_steps"])
        yield steps
        yield GaugeMetricFamily("offload_moe_tokens_per_second", "Tokens generated per second over the last 10 s",
                                value=s["tokens_per_s"])
        yield GaugeMetricFamily("offload_moe_queue_depth", "Requests waiting for a place in the batch",
                                value=s["queue_depth"])
        yield GaugeMetricFamily("offload_moe_batch_size", "Requests decoding together now", value=s["batch_size"])
        yield from _cache_metrics(self.engine.model.offload.stats())


def _cache_metrics(c: dict):
    from prometheus_client.core import CounterMetricFamily as Counter
    from prometheus_client.core import GaugeMetricFamily as Gauge

    loads = c["misses"] - c["mapped_experts"] + c["prefetch_issued"]  # a miss computed from the mapping loads nothing
    rows = (
        (Counter, "offload_moe_expert_cache_hits", "Expert requests served from a device slot", c["hits"]),
        (Counter, "offload_moe_expert_cache_misses", "Expert requests not in a device slot: read into one, or computed "
         "in place from the mapped checkpoint (io=mmap)", c["misses"]),
        (Gauge, "offload_moe_expert_cache_hit_rate", "hits / (hits + misses) since load", c["hit_rate"]),
        (Counter, "offload_moe_expert_loads", "Experts loaded: misses not computed in place from the mapped "
         "checkpoint, and prefetches", loads),
        (Counter, "offload_moe_expert_bytes_loaded", "Bytes written into expert slots", c["bytes_loaded"]),
        (Counter, "offload_moe_expert_stall_seconds", "Seconds compute waited for experts", c["stall_seconds"]),
        (Gauge, "offload_moe_prefetch_recall", "Share of needed experts already resident or in flight",
         c["prefetch_recall"]),
    )
    for family, name, help_text, value in rows:
        yield family(name, help_text, value=value)
