"""The metrics hub of `imagefab serve`: one Prometheus registry for every ingress replica.

A module of its own, light to import: the hub's replica loads this and Serve, not the generators'
torch and diffusers that app/serve/app.py brings in (seconds of CPU at every start of the server).
"""

from __future__ import annotations

from ray import serve


class _Metrics:
    """The server's Prometheus metrics, in one registry (held by `MetricsHub`)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imagefab_requests_total",
            "HTTP requests answered, by route template and status (4xx and 422 included)",
            ["route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "imagefab_request_duration_seconds",
            "Time from a request's arrival at an ingress replica to its answer",
            ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "imagefab_requests_in_flight", "Requests being served, summed over ingress replicas", registry=self.registry
        )
        self.images = Counter(
            "imagefab_images_total",
            "Images served, by QC outcome (accepted, review, rejected, failed) and combination",
            ["status", "combination"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "imagefab_backpressure_rejections_total", "Requests refused with 503 (busy)", registry=self.registry
        )


@serve.deployment(num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
class MetricsHub:
    """One registry for the whole server: every ingress replica reports here, `/metrics` reads here,
    so a scrape of any replica sees the totals of all (a replica's own registry would show a share).
    Reports are sent without waiting for them; a hub restart starts the counters again at zero,
    which Prometheus' rate() treats as a reset."""

    def __init__(self):
        self.metrics = _Metrics()
        self.in_flight_by_replica: dict[str, int] = {}

    def request(self, route: str, status: int, seconds: float) -> None:
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.duration.labels(route).observe(seconds)

    def images(self, outcomes: list[tuple[str, str]]) -> None:
        for status, combination in outcomes:
            self.metrics.images.labels(status, combination).inc()

    def rejected(self) -> None:
        self.metrics.rejected.inc()

    def in_flight(self, replica: str, count: int) -> None:
        self.in_flight_by_replica[replica] = count
        self.metrics.in_flight.set(sum(self.in_flight_by_replica.values()))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.metrics.registry)
