"""Prometheus metrics of one server instance (own registry, so tests can run several servers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The operator's rollout analysis reads capstan_serving_requests_total{code} (error rate = non-2xx /
# total) and the p99 of capstan_serving_request_latency_seconds: keep those two names stable.
PREFIX = "capstan_serving"

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    """All serving metrics, registered in a private :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Interval between consecutive generated tokens.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            f"{PREFIX}_request_latency_seconds",
            "End-to-end latency of successful completion requests.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            f"{PREFIX}_requests", "Completion requests answered, by HTTP status code.", ["code"], registry=r
        )
        self.requests_running = Gauge(
            f"{PREFIX}_requests_running", "Sequences in the running batch.", registry=r
        )
        self.requests_waiting = Gauge(
            f"{PREFIX}_requests_waiting", "Requests queued for admission.", registry=r
        )
        self.kv_blocks_used = Gauge(
            f"{PREFIX}_kv_blocks_used", "KV-cache blocks owned by sequences.", registry=r
        )
        self.kv_blocks_total = Gauge(f"{PREFIX}_kv_blocks_total", "KV-cache blocks in the pool.", registry=r)
        self.kv_cache_usage = Gauge(
            f"{PREFIX}_kv_cache_usage", "Share of the KV-cache pool owned by sequences (0..1).", registry=r
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Tokens generated over all requests.", registry=r
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            f"{PREFIX}_prefix_cache_hit_tokens",
            "Prompt tokens whose KV came from the prefix cache instead of being computed.",
            registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_errors",
            "Errors by kind (bad_request, overloaded, draining, not_ready, engine, ...).",
            ["kind"],
            registry=r,
        )

    def render(self) -> bytes:
        """Prometheus text exposition of this instance's registry."""
        return generate_latest(self.registry)
