"""Prometheus metrics of one gateway (its own registry, so several gateways can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tpmflow_requests_total",
            "Requests by endpoint, service class and status",
            ["endpoint", "service_class", "status"],
            registry=r,
        )
        self.errors = Counter(
            "tpmflow_errors_total",
            "Error responses by endpoint, service class and type",
            ["endpoint", "service_class", "type"],
            registry=r,
        )
        self.latency = Histogram(
            "tpmflow_request_latency_seconds",
            "End-to-end latency at the gateway",
            ["endpoint"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.queue_depth = Gauge("tpmflow_queue_depth", "Requests waiting for admission", registry=r)
        self.inflight = Gauge("tpmflow_inflight", "Requests forwarded to replicas now", registry=r)
        self.tokens = Counter("tpmflow_tokens_total", "Tokens processed (rate() gives tokens/s)", ["kind"], registry=r)
        self.replica_inflight = Gauge(
            "tpmflow_replica_inflight", "In-flight requests per replica", ["replica"], registry=r
        )
        self.replica_running = Gauge(
            "tpmflow_replica_running",
            "Requests running in each replica's engine (its heartbeat)",
            ["replica"],
            registry=r,
        )
        self.replica_waiting = Gauge(
            "tpmflow_replica_waiting",
            "Requests waiting in each replica's engine (its heartbeat)",
            ["replica"],
            registry=r,
        )
        self.replicas_live = Gauge("tpmflow_replicas_live", "Replicas in the rotation", registry=r)
        self.replica_failures = Counter(
            "tpmflow_replica_failures_total", "Forwarding failures per replica", ["replica"], registry=r
        )
        self.replica_restarts = Counter(
            "tpmflow_replica_restarts_total", "Replica restarts by the launcher", ["replica"], registry=r
        )
