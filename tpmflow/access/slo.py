"""Service-level objectives: each service class's targets (pool config) against what the ledger
measured over a window, for ``tpmflow slo report`` and benchmarks.

What counts, and why:

- A class's **requests** are the attempts the service answered (200) or failed (5xx) in
  [since, until). Client errors (4xx: bad input, bad token, missing permission), policy refusals
  (429: rate limits, spent allocations — reported apart as ``throttled``) and clients that hung up
  (499) are neither: they measure the caller, and one misbehaving caller must not move a class's SLO.
  An attempt the gateway retried on another replica is left out too: its client saw only the retry,
  whose latency already includes the failed attempt.
- **error rate** = failed / requests.
- **TTFT and latency** percentiles are over answered requests only (an error's speed is no service).
- **tokens/s** = output tokens of answered requests over the class's active span in the window (first
  request in to last answer out), not the whole window: a batch class that idles for most of the
  hour has not missed its throughput target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.engine import Engine, Row

from tpmflow.access.tables import LedgerEntry

if TYPE_CHECKING:
    from tpmflow.config import ServiceClass

Verdict = Literal["met", "missed", "no data"]
CheckName = Literal["ttft_p95_ms", "latency_p95_ms", "min_tokens_per_s"]
THROTTLED = 429  # policy refusals: rate limits and spent allocations


class Percentiles(BaseModel):
    """p50 / p95 / p99 (numpy's linear interpolation); None without data."""

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        if not values:
            return cls()
        p50, p95, p99 = (float(v) for v in np.percentile(np.asarray(values, dtype=float), [50, 95, 99]))
        return cls(p50=p50, p95=p95, p99=p99)


class Check(BaseModel):
    """One target of a class against its measurement."""

    name: CheckName
    target: float
    measured: float | None
    verdict: Verdict


class ClassReport(BaseModel):
    """One service class over the window."""

    service_class: str
    requests: int = Field(description="answered (200) + failed (5xx) attempts")
    answered: int
    failed: int
    throttled: int = Field(description="429s: rate limits and spent allocations, not in the error rate")
    error_rate: float | None = Field(description="failed / requests; None without requests")
    ttft_ms: Percentiles
    latency_ms: Percentiles
    output_tokens: int
    active_s: float = Field(description="first request in to last answer out, within the window")
    tokens_per_s: float | None
    checks: list[Check]
    verdict: Verdict | Literal["no targets"]


class SloReport(BaseModel):
    """Every class of the config over [since, until) (epoch seconds)."""

    since: float
    until: float
    classes: list[ClassReport]

    def of(self, service_class: str) -> ClassReport:
        return next(c for c in self.classes if c.service_class == service_class)


def slo_report(engine: Engine, classes: Mapping[str, ServiceClass], since: float, until: float) -> SloReport:
    """Measure each class in ``classes`` from the ledger rows created in [since, until) and check its
    SLO targets; classes without targets are measured too (verdict ``no targets``)."""
    query = select(
        LedgerEntry.service_class,
        LedgerEntry.principal,
        LedgerEntry.request_id,
        LedgerEntry.retry_of,
        LedgerEntry.status,
        LedgerEntry.latency_ms,
        LedgerEntry.ttft_ms,
        LedgerEntry.output_tokens,
        LedgerEntry.created,
    ).where(
        LedgerEntry.created >= since,
        LedgerEntry.created < until,
        LedgerEntry.service_class.in_(list(classes)),
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    retried = {(r.principal, r.retry_of) for r in rows if r.retry_of is not None}
    by_class: dict[str, list[Row]] = {name: [] for name in classes}
    for r in rows:
        if (r.principal, r.request_id) not in retried:
            by_class[r.service_class].append(r)
    return SloReport(
        since=since,
        until=until,
        classes=[_measure(name, classes[name], by_class[name]) for name in classes],
    )


def _measure(name: str, targets: ServiceClass, rows: list[Row]) -> ClassReport:
    answered = [r for r in rows if r.status == 200]
    failed = sum(1 for r in rows if r.status >= 500)
    requests = len(answered) + failed
    ttft = Percentiles.of([r.ttft_ms for r in answered if r.ttft_ms is not None])
    latency = Percentiles.of([r.latency_ms for r in answered if r.latency_ms is not None])
    output_tokens = sum(r.output_tokens for r in answered)
    if answered:
        first_in = min(r.created - (r.latency_ms or 0.0) / 1000 for r in answered)
        active_s = max(r.created for r in answered) - first_in
    else:
        active_s = 0.0
    tokens_per_s = output_tokens / active_s if output_tokens and active_s > 0 else None
    checks = [
        check
        for check in (
            _check("ttft_p95_ms", targets.ttft_p95_ms, ttft.p95, lower_is_better=True),
            _check("latency_p95_ms", targets.latency_p95_ms, latency.p95, lower_is_better=True),
            _check("min_tokens_per_s", targets.min_tokens_per_s, tokens_per_s, lower_is_better=False),
        )
        if check is not None
    ]
    return ClassReport(
        service_class=name,
        requests=requests,
        answered=len(answered),
        failed=failed,
        throttled=sum(1 for r in rows if r.status == THROTTLED),
        error_rate=failed / requests if requests else None,
        ttft_ms=ttft,
        latency_ms=latency,
        output_tokens=output_tokens,
        active_s=active_s,
        tokens_per_s=tokens_per_s,
        checks=checks,
        verdict=_overall(checks),
    )


def _check(name: CheckName, target: float | None, measured: float | None, *, lower_is_better: bool) -> Check | None:
    """A target is met exactly at its value."""
    if target is None:
        return None
    if measured is None:
        return Check(name=name, target=target, measured=None, verdict="no data")
    met = measured <= target if lower_is_better else measured >= target
    return Check(name=name, target=target, measured=measured, verdict="met" if met else "missed")


def _overall(checks: list[Check]) -> Verdict | Literal["no targets"]:
    """Missed if any target is missed; met if every target with data is met; no data without any."""
    if not checks:
        return "no targets"
    verdicts = {c.verdict for c in checks}
    if "missed" in verdicts:
        return "missed"
    return "met" if "met" in verdicts else "no data"
