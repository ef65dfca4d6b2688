"""The server's Prometheus metrics (GET /metrics), in a registry of its own so that several servers can live in
one process (tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# latency buckets (seconds): from a fast GPU decode step to a slow CPU prefill
_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
    30,
)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "smalto_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("smalto_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("smalto_generation_tokens", "Tokens generated", registry=r)
        self.queue = Gauge("smalto_queue_length", "Requests waiting for a slot", registry=r)
        self.running = Gauge("smalto_running", "Sequences holding a slot (prefill or decode)", registry=r)
        self.occupancy = Gauge("smalto_batch_occupancy", "Running sequences / max batch", registry=r)
        self.ttft = Histogram(
            "smalto_time_to_first_token_seconds", "Arrival to first token", buckets=_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "smalto_inter_token_latency_seconds",
            "Between two tokens of a sequence",
            buckets=_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "smalto_request_latency_seconds", "Arrival to last token", buckets=_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
