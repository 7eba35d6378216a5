"""Prometheus metrics of one gateway (its own registry, so several gateways can live in one process;
with several worker processes, Prometheus' multiprocess mode adds them up)."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# Seconds, from a tiny model on a CPU (milliseconds) to a TPM's long generations (minutes).
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKENS_PER_S = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def multiprocess() -> bool:
    """Whether metrics are kept in files shared by several gateway worker processes (Prometheus'
    multiprocess mode, set up by ``tpmflow.gateway.serve`` before the workers start)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


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
        self.queue_depth = Gauge(
            "tpmflow_queue_depth", "Requests waiting for admission", registry=r, multiprocess_mode="livesum"
        )
        self.inflight = Gauge(
            "tpmflow_inflight", "Requests forwarded to replicas now", registry=r, multiprocess_mode="livesum"
        )
        self.tokens = Counter("tpmflow_tokens_total", "Tokens processed (rate() gives tokens/s)", ["kind"], registry=r)
        self._prompt_tokens = self.tokens.labels("prompt")
        self._output_tokens = self.tokens.labels("output")
        self._attempt_children: dict[tuple[str, str, int, str | None], tuple[Any, Any, Any]] = {}
        self.replica_inflight = Gauge(
            "tpmflow_replica_inflight",
            "In-flight requests per replica",
            ["replica"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.replica_running = Gauge(
            "tpmflow_replica_running",
            "Requests running in each replica's engine (its heartbeat)",
            ["replica"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.replica_waiting = Gauge(
            "tpmflow_replica_waiting",
            "Requests waiting in each replica's engine (its heartbeat)",
            ["replica"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.replicas_live = Gauge(
            "tpmflow_replicas_live", "Replicas in the rotation", registry=r, multiprocess_mode="mostrecent"
        )
        self.replica_failures = Counter(
            "tpmflow_replica_failures_total", "Forwarding failures per replica", ["replica"], registry=r
        )
        self.replica_restarts = Counter(
            "tpmflow_replica_restarts_total", "Replica restarts by the launcher", ["replica"], registry=r
        )
        self.group_replicas = Gauge(
            "tpmflow_group_replicas",
            "Replicas a scaling group runs (not draining)",
            ["group"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        # SLO measurements of answered requests (status 200), per service class: the targets
        # live in the pool config's service classes (tpmflow.access.slo reads the same from the ledger).
        self.ttft = Histogram(
            "tpmflow_ttft_seconds",
            "Time to first token at the gateway (a non-streamed answer: its whole latency)",
            ["service_class"],
            registry=r,
            buckets=_SECONDS,
        )
        self.e2e_latency = Histogram(
            "tpmflow_e2e_latency_seconds",
            "End-to-end latency at the gateway, to the answer or the end of its stream",
            ["service_class"],
            registry=r,
            buckets=_SECONDS,
        )
        self.output_tokens_per_s = Histogram(
            "tpmflow_output_tokens_per_second",
            "Per request: output tokens over its engine time (requests with output tokens)",
            ["service_class"],
            registry=r,
            buckets=_TOKENS_PER_S,
        )
        # Uptime (tpmflow.pool.uptime sets these).
        self.pool_uptime = Gauge(
            "tpmflow_pool_uptime_seconds", "Seconds since the gateway started", registry=r, multiprocess_mode="max"
        )
        self.replica_uptime = Gauge(
            "tpmflow_replica_uptime_seconds",
            "Seconds since each replica (re)joined the rotation; 0 while it is out of it",
            ["replica"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.pool_unavailable = Counter(
            "tpmflow_pool_unavailable_seconds_total",
            "Seconds the pool had no live replica, counted from the first replica's joining",
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text /metrics answers: this process's registry, or every worker's together."""
        if not multiprocess():
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged)

    def observe_attempt(
        self,
        endpoint: str,
        service_class: str,
        status: int,
        error_type: str | None,
        latency_ms: float,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        """The counters of one attempt. Label children are looked up once per label set and kept:
        ``labels()`` takes a lock and builds a tuple on every call, on the request path."""
        key = (endpoint, service_class, status, error_type)
        children = self._attempt_children.get(key)
        if children is None:
            children = self._attempt_children[key] = (
                self.requests.labels(endpoint, service_class, str(status)),
                self.latency.labels(endpoint),
                self.errors.labels(endpoint, service_class, error_type) if error_type else None,
            )
        requests, latency, errors = children
        requests.inc()
        latency.observe(latency_ms / 1000)
        if errors is not None:
            errors.inc()
        if prompt_tokens:
            self._prompt_tokens.inc(prompt_tokens)
        if output_tokens:
            self._output_tokens.inc(output_tokens)

    def observe_answer(
        self, service_class: str, latency_ms: float, ttft_ms: float | None, output_tokens: int, engine_ms: float
    ) -> None:
        """The SLO histograms of one answered request (times in ms, as the ledger has them)."""
        self.e2e_latency.labels(service_class).observe(latency_ms / 1000)
        if ttft_ms is not None:
            self.ttft.labels(service_class).observe(ttft_ms / 1000)
        if output_tokens > 0 and engine_ms > 0:
            self.output_tokens_per_s.labels(service_class).observe(output_tokens / (engine_ms / 1000))
