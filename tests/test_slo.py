"""SLO measurement: percentiles, error rate and throughput from hand-made ledger rows (exact values,
window and target boundaries), the timing columns' migration on older databases, pool and replica
uptime, then the real path: a gateway over the session pool's replicas fills the ledger's timings
and the per-class histograms, and `tpmflow slo report` reads them back."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from tpmflow.access import AccessDB, LedgerRow
from tpmflow.access.slo import slo_report
from tpmflow.access.tables import LedgerEntry
from tpmflow.cli import app
from tpmflow.config import ServiceClass
from tpmflow.gateway.metrics import GatewayMetrics
from tpmflow.gateway.uptime import Uptime
from tpmflow.pool.registry import ReplicaRegistry
from tpmflow.schema import ReplicaInfo

T0 = 1_000_000.0


def _row(service_class: str, status: int = 200, **fields: Any) -> LedgerRow:
    defaults: dict[str, Any] = {
        "request_id": uuid.uuid4().hex,
        "principal": "alice",
        "project": "chem",
        "endpoint": "completions",
        "model": "m",
        "content_hash": "h",
        "created": T0,
    }
    return LedgerRow(service_class=service_class, status=status, **{**defaults, **fields})


def _insert(db: AccessDB, rows: list[LedgerRow]) -> None:
    with Session(db.engine) as s, s.begin():
        s.add_all([LedgerEntry(**asdict(r)) for r in rows])


@pytest.fixture()
def db(tmp_path: Path) -> AccessDB:
    return AccessDB(f"sqlite:///{tmp_path / 'access.db'}")


# -- the computation, on hand-made rows ------------------------------------------------------------


def test_percentiles_and_targets_met_exactly_at_their_value(db: AccessDB) -> None:
    # TTFT 0, 5, …, 100 ms: p50 = 50, p95 = 95, p99 = 99 (numpy's linear interpolation: 20 gaps)
    _insert(db, [_row("interactive", ttft_ms=5.0 * i, latency_ms=10.0 * i, created=T0 + i) for i in range(21)])
    classes = {
        "interactive": ServiceClass(ttft_p95_ms=95, latency_p95_ms=189.9),
        "lenient": ServiceClass(ttft_p95_ms=1000),
    }
    report = slo_report(db.engine, classes, T0, T0 + 3600)
    c = report.of("interactive")
    assert (c.ttft_ms.p50, c.ttft_ms.p95, c.ttft_ms.p99) == pytest.approx((50.0, 95.0, 99.0))
    assert (c.latency_ms.p50, c.latency_ms.p95, c.latency_ms.p99) == pytest.approx((100.0, 190.0, 198.0))
    assert (c.requests, c.answered, c.failed, c.error_rate) == (21, 21, 0, 0.0)
    assert [(k.name, k.verdict) for k in c.checks] == [("ttft_p95_ms", "met"), ("latency_p95_ms", "missed")]
    assert c.verdict == "missed"
    assert report.of("lenient").verdict == "no data" and report.of("lenient").requests == 0


def test_error_rate_counts_server_failures_not_callers_or_retried_attempts(db: AccessDB) -> None:
    cls = "interactive"
    rows = [
        *[_row(cls, 200, ttft_ms=1.0, latency_ms=1.0) for _ in range(5)],
        _row(cls, 502, request_id="x", error_type="ReplicaFailed"),  # retried: its client saw only x.r1
        _row(cls, 200, request_id="x.r1", retry_of="x", ttft_ms=1.0, latency_ms=1.0),
        _row(cls, 502, error_type="ReplicaFailed"),
        _row(cls, 503, error_type="Overloaded"),
        _row(cls, 504, error_type="ReplicaFailed"),
        _row(cls, 429, error_type="RateLimited"),
        _row(cls, 429, error_type="QuotaExceeded"),
        _row(cls, 400, error_type="InvalidRequest"),
        _row(cls, 401, error_type="Unauthorized"),
        _row(cls, 403, error_type="Forbidden"),
        _row(cls, 499, error_type="ClientDisconnected", ttft_ms=1.0, latency_ms=9.0),
    ]
    _insert(db, rows)
    c = slo_report(db.engine, {cls: ServiceClass()}, T0, T0 + 1).of(cls)
    assert (c.requests, c.answered, c.failed, c.throttled) == (9, 6, 3, 2)
    assert c.error_rate == pytest.approx(3 / 9)
    assert c.latency_ms.p99 == 1.0, "percentiles are over answered requests only"
    assert c.verdict == "no targets" and c.checks == []


def test_window_is_half_open_and_other_classes_are_ignored(db: AccessDB) -> None:
    _insert(
        db,
        [
            _row("batch", created=T0 - 0.001, latency_ms=1.0, ttft_ms=1.0),
            _row("batch", created=T0, latency_ms=2.0, ttft_ms=2.0),  # in: since is inclusive
            _row("batch", created=T0 + 59.999, latency_ms=3.0, ttft_ms=3.0),
            _row("batch", created=T0 + 60, latency_ms=4.0, ttft_ms=4.0),  # out: until is exclusive
            _row("unknown", created=T0 + 1, latency_ms=5.0, ttft_ms=5.0),
        ],
    )
    report = slo_report(db.engine, {"batch": ServiceClass()}, T0, T0 + 60)
    assert [c.service_class for c in report.classes] == ["batch"]
    c = report.of("batch")
    assert c.requests == 2 and (c.latency_ms.p50, c.latency_ms.p99) == pytest.approx((2.5, 2.99))


def test_throughput_is_over_the_active_span_not_the_window(db: AccessDB) -> None:
    # 3 answers of 100 tokens, each 10 s long, ending at +10, +20, +30: active from +0 to +30 s.
    _insert(
        db,
        [
            _row("batch", output_tokens=100, latency_ms=10_000.0, ttft_ms=1.0, created=T0 + 10.0 * (i + 1))
            for i in range(3)
        ]
        + [_row("batch", 503, output_tokens=0, created=T0 + 5)],
    )
    classes = {"batch": ServiceClass(min_tokens_per_s=10), "greedy": ServiceClass(min_tokens_per_s=10.5)}
    c = slo_report(db.engine, {"batch": classes["batch"]}, T0 - 3600, T0 + 3600).of("batch")
    assert c.output_tokens == 300 and c.active_s == pytest.approx(30.0) and c.tokens_per_s == pytest.approx(10.0)
    assert (c.checks[0].verdict, c.verdict, c.error_rate) == ("met", "met", 0.25)
    greedy = slo_report(db.engine, {"batch": classes["greedy"]}, T0 - 3600, T0 + 3600).of("batch")
    assert greedy.verdict == "missed"


def test_an_older_ledger_gets_the_timing_columns_on_startup(access: AccessDB) -> None:
    """Rows from before the columns have no timings: counted as requests, not in the percentiles."""
    who = f"old-{uuid.uuid4().hex[:8]}"
    with access.engine.begin() as conn:  # make it look like a database from before SLO timings
        conn.execute(text("ALTER TABLE request_ledger DROP COLUMN latency_ms"))
        conn.execute(text("ALTER TABLE request_ledger DROP COLUMN ttft_ms"))
        conn.execute(
            text(
                "INSERT INTO request_ledger (principal, request_id, project, service_class, endpoint, model,"
                " content_hash, prompt_tokens, output_tokens, payload_bytes_in, payload_bytes_out,"
                " activation_bytes, queue_ms, engine_ms, status, created)"
                f" VALUES ('{who}', 'r1', 'p', '{who}', 'completions', 'm', 'h', 5, 5, 0, 0, 0, 0, 0, 200, {T0})"
            )
        )
    access.engine.dispose()
    again = AccessDB(access.url)
    (row,) = again.ledger_rows(principal=who)
    assert row.latency_ms is None and row.ttft_ms is None and row.output_tokens == 5
    AccessDB(access.url).engine.dispose()  # idempotent
    _insert(again, [_row(who, principal=who, ttft_ms=7.0, latency_ms=8.0, created=T0 + 1)])
    c = slo_report(again.engine, {who: ServiceClass(ttft_p95_ms=7)}, T0, T0 + 2).of(who)
    assert c.requests == 2 and c.ttft_ms.p50 == 7.0 and c.verdict == "met"
    again.engine.dispose()


# -- uptime -----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_uptime_of_replicas_and_seconds_without_any() -> None:
    registry, metrics, clock = ReplicaRegistry(heartbeat_timeout_s=1e9), GatewayMetrics(), Clock()
    uptime = Uptime(registry, metrics, clock)
    info = ReplicaInfo(
        replica_id="r0", url="http://r0", model="m", content_hash="h", engine="e", hidden_size=8, max_model_len=64
    )

    def sample(name: str, **labels: str) -> float | None:
        uptime.export()
        return metrics.registry.get_sample_value(name, labels)

    clock.now = 1005.0
    uptime.check()
    uptime.heartbeat(info)
    clock.now = 1010.0
    assert sample("tpmflow_pool_uptime_seconds") == 10.0
    assert sample("tpmflow_replica_uptime_seconds", replica="r0") == 5.0
    assert sample("tpmflow_pool_unavailable_seconds_total") == 0.0, "start-up is not an outage"
    uptime.heartbeat(info)
    clock.now = 1011.0
    assert sample("tpmflow_replica_uptime_seconds", replica="r0") == 6.0, "a heartbeat is no rejoin"
    registry.mark_dead("r0")  # a dropped connection: out of the rotation until it heartbeats again
    uptime.check()
    clock.now = 1021.0
    assert sample("tpmflow_replica_uptime_seconds", replica="r0") == 0.0
    clock.now = 1025.0
    uptime.heartbeat(info)
    clock.now = 1030.0
    assert sample("tpmflow_replica_uptime_seconds", replica="r0") == 5.0
    assert sample("tpmflow_pool_unavailable_seconds_total") == 14.0  # 1011 to 1025
    clock.now = 1031.0
    uptime.heartbeat(info.model_copy(update={"url": "http://r0-restarted"}))  # restarted between checks
    clock.now = 1032.0
    assert sample("tpmflow_replica_uptime_seconds", replica="r0") == 1.0
    assert sample("tpmflow_pool_unavailable_seconds_total") == 14.0
    registry.replicas = {}  # scaled down: the registry forgets it, and so does /metrics
    assert sample("tpmflow_replica_uptime_seconds", replica="r0") is None


# -- through a real gateway -------------------------------------------------------------------------

TARGETS = {"ttft_p95_ms": 60_000, "latency_p95_ms": 60_000, "min_tokens_per_s": 0.01}


def test_ledger_timings_metrics_and_report_through_the_gateway(pool: Any, side_gateway: Any, tmp_path: Path) -> None:
    cls = f"slo-{uuid.uuid4().hex[:8]}"  # this test's own class: the session ledger holds others' rows
    cfg = pool.cfg.model_copy(deep=True)
    cfg.service_classes[cls] = ServiceClass(priority=5, **TARGETS)
    who = f"slo-{uuid.uuid4().hex[:8]}"
    token = pool.add_principal(who, f"{who}-project", {"generate"}, cls)
    headers = {"Authorization": f"Bearer {token}"}
    body = {"model": "tiny-llama", "prompt": "CCO", "max_tokens": 8, "ignore_eos": True}
    with side_gateway(cfg) as (_, url, _loop):
        for i in range(3):
            r = httpx.post(
                f"{url}/v1/completions", json=body, headers={**headers, "X-Request-Id": f"{who}-{i}"}, timeout=60
            )
            assert r.status_code == 200, r.text
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            json={**body, "stream": True},
            headers={**headers, "X-Request-Id": f"{who}-stream"},
            timeout=60,
        ) as r:
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and chunks[-1] == "data: [DONE]"
        metrics = httpx.get(f"{url}/metrics", timeout=10).text

    deadline = time.monotonic() + 60  # a stream's row is completed just after its last chunk
    while True:
        pool.ledger.flush()
        rows = {r.correlation_id: r for r in pool.access.ledger_rows(principal=who)}
        if (len(rows) == 4 and all(r.status != 0 for r in rows.values())) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(rows) == sorted([f"{who}-0", f"{who}-1", f"{who}-2", f"{who}-stream"])
    for i in range(3):
        row = rows[f"{who}-{i}"]
        assert row.latency_ms is not None and row.latency_ms > 0 and row.ttft_ms == row.latency_ms
    stream = rows[f"{who}-stream"]
    assert stream.ttft_ms is not None and stream.latency_ms is not None
    assert stream.latency_ms >= stream.ttft_ms > 0 and stream.output_tokens == 8

    for name in ("tpmflow_ttft_seconds", "tpmflow_e2e_latency_seconds", "tpmflow_output_tokens_per_second"):
        assert f'{name}_count{{service_class="{cls}"}} 4.0' in metrics, name
    assert "tpmflow_pool_uptime_seconds " in metrics and "tpmflow_pool_unavailable_seconds_total 0.0" in metrics
    assert 'tpmflow_replica_uptime_seconds{replica="' in metrics

    config = tmp_path / "pool.yaml"
    config.write_text(
        yaml.safe_dump({"model": "tiny-llama", "database_url": cfg.database_url, "service_classes": {cls: TARGETS}})
    )
    runner = CliRunner()
    out = runner.invoke(app, ["slo", "report", "--config", str(config), "--window", "10m", "--json"])
    assert out.exit_code == 0, out.output
    (measured,) = json.loads(out.output)["classes"]
    assert measured["service_class"] == cls and measured["verdict"] == "met"
    assert (measured["requests"], measured["answered"], measured["error_rate"]) == (4, 4, 0.0)
    assert measured["output_tokens"] == 32 and measured["tokens_per_s"] > 0
    assert measured["latency_ms"]["p99"] >= measured["ttft_ms"]["p50"] > 0
    table = runner.invoke(app, ["slo", "report", "--config", str(config)], env={"COLUMNS": "220"})
    assert table.exit_code == 0 and cls in table.output and "MET" in table.output, table.output


def test_an_older_ledger_gets_its_missing_indexes_on_startup(access: AccessDB) -> None:
    """A column added by migration comes without its index (correlation_id: the workbench looks a
    request's charge up by it); startup creates every declared index a database lacks."""
    from sqlalchemy import inspect

    with access.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_request_ledger_correlation_id"))
    access.engine.dispose()
    assert "ix_request_ledger_correlation_id" not in {i["name"] for i in inspect(access.engine).get_indexes("request_ledger")}
    again = AccessDB(access.url)
    assert "ix_request_ledger_correlation_id" in {i["name"] for i in inspect(again.engine).get_indexes("request_ledger")}
    AccessDB(access.url).engine.dispose()  # idempotent
    again.engine.dispose()
