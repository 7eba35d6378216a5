"""Service-unit charges and project allocations: the cost model, atomic reservations under real
concurrency on SQLite and PostgreSQL, settlement, migration of older ledgers, and charges through
the real gateway."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import text

from tpmflow.access import AccessDB, CostModel, LedgerRow
from tpmflow.access.costs import MICRO, Limits, max_charge, max_counters, to_micro
from tpmflow.errors import QuotaExceeded


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # PostgreSQL's database is shared between runs


# -- the cost model ------------------------------------------------------------------------------

PRICES = CostModel(
    su_per_prompt_token=0.001,
    su_per_output_token=0.003,
    su_per_mb_in=0.5,
    su_per_mb_out=0.25,
    su_per_mb_activations=0.125,
    su_per_engine_second=0.01,
    class_multipliers={"batch": 0.5},
)


def test_charge_is_the_priced_sum_times_the_class_multiplier() -> None:
    counters = {
        "prompt_tokens": 100,
        "output_tokens": 10,
        "payload_bytes_in": 2_000_000,
        "payload_bytes_out": 4_000_000,
        "activation_bytes": 8_000_000,
        "engine_ms": 1500.0,
    }
    full = 100 * 0.001 + 10 * 0.003 + 2 * 0.5 + 4 * 0.25 + 8 * 0.125 + 1.5 * 0.01
    assert PRICES.charge("interactive", **counters) == pytest.approx(full)
    assert PRICES.charge("batch", **counters) == pytest.approx(full / 2)
    assert PRICES.charge("unknown-class", **counters) == pytest.approx(full)  # unlisted classes pay 1x
    assert CostModel().charge("interactive") == 0.0


def test_bounds_follow_the_requests_own_limits() -> None:
    limits = Limits(max_model_len=1024, hidden_size=128, max_activation_bytes=1 << 20, request_timeout_s=60)
    c = max_counters("completions", {"prompt": ["a", "b", "c"], "max_tokens": 8, "n": 2}, 50, limits)
    assert c["prompt_tokens"] == 3 * 1024 and c["output_tokens"] == 3 * 2 * 8 and c["engine_ms"] == 60_000
    assert max_counters("completions", {"prompt": [1, 2, 3]}, 10, limits)["output_tokens"] == 1024  # one id list
    assert max_counters("chat", {"messages": [{"role": "user", "content": "x"}]}, 10, limits)["prompt_tokens"] == 1024
    ref = {"key": "k", "sig": "s", "nbytes": 5_000_000, "principal": "p"}
    c = max_counters("embed", {"input": [{"prompt_embeds": ref}, "text"], "pooling": "none"}, 300, limits)
    assert c["payload_bytes_in"] == 300 + 5_000_000 and c["payload_bytes_out"] == 2 * (1024 * 128 * 4 + 1024)
    probe = max_counters("probe", {"prompt": "x", "captures": [{"site": "hook_z"}]}, 10, limits)
    assert probe["activation_bytes"] == 1 << 20 and probe["output_tokens"] == 1
    assert max_counters("probe", {"prompt": "x"}, 10, limits)["activation_bytes"] == 0
    assert max_charge(PRICES, "batch", "probe", {"prompt": "x"}, 10, limits) == pytest.approx(
        PRICES.charge("batch", **max_counters("probe", {"prompt": "x"}, 10, limits))
    )
    assert to_micro(0.001, up=True) == 1000 and to_micro(1e-7, up=True) == 1  # float noise ignored, bounds up


# -- allocations in the database -----------------------------------------------------------------


def test_concurrent_reservations_cover_exactly_the_allocation(access: AccessDB) -> None:
    """Threads hammer one principal's project allocation that covers exactly N reservations:
    exactly N succeed, the balance never goes negative, and ends at zero once they are settled."""
    project, who = _name("proj"), _name("alice")
    n, threads, amount = 7, 24, 0.123457
    access.allocations.create(project, n * to_micro(amount, up=True) / MICRO)
    start = threading.Barrier(threads + 1)
    won: list[Any] = []
    refused: list[str] = []
    lock = threading.Lock()
    negative: list[dict[str, Any]] = []
    watch_errors: list[BaseException] = []
    hammering = threading.Event()

    def worker() -> None:
        start.wait()
        try:
            r = access.allocations.reserve(project, who, amount)
            with lock:
                won.append(r)
        except QuotaExceeded as exc:
            with lock:
                refused.append(str(exc))

    def watch() -> None:  # reads the real row while the writers race
        try:
            while hammering.is_set():
                (row,) = access.allocations.show(project)
                if row["available_su"] < 0 or row["balance_su"] < 0:
                    negative.append(row)
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - asserted in the test's thread
            watch_errors.append(exc)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    hammering.set()
    watcher = threading.Thread(target=watch)
    watcher.start()
    start.wait()
    for t in pool:
        t.join(60)
    hammering.clear()
    watcher.join(10)
    assert len(won) == n and len(refused) == threads - n
    assert all("balance" in m for m in refused)
    (row,) = access.allocations.show(project)
    assert row["available_su"] == 0 and row["reserved_su"] == pytest.approx(n * to_micro(amount, up=True) / MICRO)
    for r in won:
        access.allocations.settle(r, amount)  # each request used all it reserved
    (row,) = access.allocations.show(project)
    assert row["balance_su"] == 0 and row["available_su"] == 0 and row["reserved_su"] == 0
    assert not negative, negative[:3]
    assert not watch_errors, watch_errors
    with pytest.raises(QuotaExceeded, match="balance 0 SU"):
        access.allocations.reserve(project, who, amount)


def test_principal_caps_are_reserved_atomically_too(access: AccessDB) -> None:
    project, capped, free = _name("proj"), _name("capped"), _name("free")
    amount = 1.0
    access.allocations.create(project, 100, caps={capped: 3})
    start = threading.Barrier(12)
    won: list[Any] = []
    refusals: list[str] = []

    def worker() -> None:
        start.wait()
        try:
            won.append(access.allocations.reserve(project, capped, amount))
        except QuotaExceeded as exc:
            refusals.append(str(exc))  # checked in the test's thread, where a failure counts

    pool = [threading.Thread(target=worker) for _ in range(12)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert len(won) == 3 and len(refusals) == 9
    assert all("cap" in m and "balance" in m for m in refusals), refusals[:2]
    (row,) = access.allocations.show(project)
    assert row["caps"][capped]["reserved_su"] == 3 and row["reserved_su"] == 3
    assert access.allocations.reserve(project, free, 50) is not None  # the project still has SUs for others


def test_settle_releases_the_reservation_and_charges_the_real_amount(access: AccessDB) -> None:
    project, who = _name("proj"), _name("bob")
    access.allocations.create(project, 10, caps={who: 8})
    failed = access.allocations.reserve(project, who, 6)
    assert failed is not None
    (row,) = access.allocations.show(project)
    assert row["available_su"] == 4 and row["caps"][who]["reserved_su"] == 6
    assert access.allocations.settle(failed, 0.0) == 0.0  # a request that failed used nothing
    (row,) = access.allocations.show(project)
    assert row["available_su"] == 10 and row["reserved_su"] == 0 and row["caps"][who]["reserved_su"] == 0
    done = access.allocations.reserve(project, who, 6)
    assert done is not None
    assert access.allocations.settle(done, 2.5) == 2.5
    over = access.allocations.reserve(project, who, 1)
    assert over is not None
    assert access.allocations.settle(over, 5.0) == 1.0  # never more than was reserved
    (row,) = access.allocations.show(project)
    assert row["spent_su"] == 3.5 and row["balance_su"] == 6.5 and row["reserved_su"] == 0
    assert row["caps"][who]["spent_su"] == 3.5
    with pytest.raises(QuotaExceeded, match="cap"):
        access.allocations.reserve(project, who, 5)  # 8 - 3.5 left on the cap
    access.allocations.topup(project, 5)
    (row,) = access.allocations.show(project)
    assert row["granted_su"] == 15 and row["balance_su"] == 11.5


def test_an_allocation_of_n_times_a_price_admits_n_requests(access: AccessDB) -> None:
    """Issue 13: 10 x 0.656000075 SU admitted 9 (grant rounded to nearest, reservations up)."""
    for price, n in ((0.656000075, 10), (0.6559996, 10), (0.3, 10), (1 / 3, 3), (2.5e-7, 4)):
        project, who = _name("exact"), _name("eve")
        access.allocations.create(project, n * price)
        held = [access.allocations.reserve(project, who, price) for _ in range(n)]
        assert all(h is not None for h in held), (price, n)
        if to_micro(price, down=True) > 0:
            with pytest.raises(QuotaExceeded):
                access.allocations.reserve(project, who, price)
        for h in held:
            assert h is not None and access.allocations.settle(h, price) <= price
        (row,) = access.allocations.show(project)
        assert row["balance_su"] >= 0 and row["reserved_su"] == 0


def test_projects_without_allocations_are_unlimited_and_periods_matter(access: AccessDB) -> None:
    assert access.allocations.reserve(_name("free"), "anyone", 1e12) is None
    old, now = _name("old"), time.time()
    access.allocations.create(old, 100, starts=now - 200, ends=now - 100)
    with pytest.raises(QuotaExceeded, match="no allocation covering now"):
        access.allocations.reserve(old, "anyone", 1)
    later = _name("later")
    access.allocations.create(later, 100, starts=now + 100, ends=now + 200)
    with pytest.raises(QuotaExceeded):
        access.allocations.reserve(later, "anyone", 1)
    assert access.allocations.reserve(later, "anyone", 1, now=now + 150) is not None


def test_usage_reports_charges_and_filters_by_period(access: AccessDB) -> None:
    from tpmflow.access import LedgerWriter

    who, project = _name("meter"), _name("proj")
    writer = LedgerWriter(access.engine, flush_interval_s=0.05)
    for i, created in enumerate((1000.0, 2000.0, 3000.0)):
        writer.record(
            LedgerRow(
                request_id=f"r{i}",
                principal=who,
                project=project,
                service_class="interactive",
                endpoint="completions",
                model="m",
                content_hash="h",
                status=200,
                prompt_tokens=10,
                created=created,
                charge_su=0.25 * (i + 1),
            )
        )
    writer.flush()
    writer.close()
    (all_rows,) = [r for r in access.usage("project", charges=True) if r["project"] == project]
    assert all_rows["charge_su"] == pytest.approx(1.5) and all_rows["requests"] == 3
    (mid,) = access.usage("principal", who, since=1500, until=3000, charges=True)
    assert mid["requests"] == 1 and mid["charge_su"] == pytest.approx(0.5)
    assert "charge_su" not in access.usage("principal", who)[0]  # the old shape unless asked


def test_an_older_ledger_gets_charge_su_on_startup(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = AccessDB(url)
    with db.engine.begin() as conn:  # make it look like a database from before charges
        conn.execute(text("ALTER TABLE request_ledger DROP COLUMN charge_su"))
        conn.execute(
            text(
                "INSERT INTO request_ledger (principal, request_id, project, service_class, endpoint, model,"
                " content_hash, prompt_tokens, output_tokens, payload_bytes_in, payload_bytes_out,"
                " activation_bytes, queue_ms, engine_ms, status, created)"
                " VALUES ('old', 'r1', 'p', 'interactive', 'completions', 'm', 'h', 5, 5, 0, 0, 0, 0, 0, 200, 1)"
            )
        )
    db.engine.dispose()
    again = AccessDB(url)
    (row,) = again.ledger_rows(principal="old")
    assert row.charge_su == 0.0 and row.prompt_tokens == 5
    AccessDB(url)  # idempotent
    assert again.usage("principal", "old", charges=True)[0]["charge_su"] == 0.0


# -- through the real gateway --------------------------------------------------------------------


@pytest.fixture()
def priced(pool: Any) -> Iterator[CostModel]:
    """The session pool with distinct prices for every counter (restored afterwards)."""
    before = pool.cfg.costs
    pool.cfg.costs = PRICES
    yield PRICES
    pool.cfg.costs = before


def _rows(pool: Any, principal: str) -> list[Any]:
    pool.ledger.flush()
    return sorted(pool.access.ledger_rows(principal=principal), key=lambda r: r.created)


def test_charges_through_the_gateway_match_the_cost_model(pool: Any, priced: CostModel) -> None:
    from tpmflow.client import Client
    from tpmflow.schema import Capture

    project, who = _name("chem"), _name("campaign")
    pool.access.allocations.create(project, 10_000)
    token = pool.add_principal(who, project, {"generate", "embed", "probe"}, "batch")
    with Client(pool.url, token=token) as c:
        c.generate("CCO", max_tokens=8, temperature=0.0)
        c.embed(["CCO", "c1ccccc1"])
        ref = c.put(np.ones((512, 1024), dtype=np.float32))  # 2 MiB in, by reference
        c.digest(ref)
        c.embed(["x" * 600], pooling="none")  # 600 x 128 float32 per-token states: out by reference
        c.probe("CCO", capture=[Capture(site="blocks.0.hook_mlp_out")])
    rows = _rows(pool, who)
    by_endpoint = {r.endpoint: r for r in rows}
    assert [r.status for r in rows] == [200] * 5
    assert by_endpoint["completions"].output_tokens > 0 and by_endpoint["digest"].payload_bytes_in >= 2 << 20
    assert max(r.payload_bytes_out for r in rows) > 256 << 10 and by_endpoint["probe"].activation_bytes > 0
    for r in rows:
        assert r.engine_ms > 0 and r.service_class == "batch"
        assert r.charge_su == pytest.approx(priced.charge_of(r), rel=1e-9, abs=1e-9), r.endpoint
        assert r.charge_su == pytest.approx(priced.charge("interactive", **_counters(r)) / 2)
    (alloc,) = pool.access.allocations.show(project)
    assert alloc["reserved_su"] == 0
    assert alloc["spent_su"] == pytest.approx(sum(r.charge_su for r in rows), abs=len(rows) * 1e-6)
    (mine,) = [u for u in pool.access.usage("project", charges=True) if u["project"] == project]
    assert mine["charge_su"] == pytest.approx(sum(r.charge_su for r in rows))


def _counters(row: Any) -> dict[str, Any]:
    keys = ("prompt_tokens", "output_tokens", "payload_bytes_in", "payload_bytes_out", "activation_bytes", "engine_ms")
    return {k: getattr(row, k) for k in keys}


def test_quota_exceeded_is_a_429_with_the_balance_and_the_pool_stays_up(pool: Any, priced: CostModel) -> None:
    from tpmflow.client import Client

    project, who = _name("poor"), _name("student")
    pool.access.allocations.create(project, 1.0)  # less than one completion's largest possible charge
    token = pool.add_principal(who, project, {"generate"})
    resp = httpx.post(
        f"{pool.url}/v1/completions",
        json={"prompt": "CCO", "max_tokens": 8},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert resp.status_code == 429
    error = resp.json()["error"]
    assert error["type"] == "QuotaExceeded" and "balance 1 SU" in error["message"], error
    with Client(pool.url, token=token) as c, pytest.raises(QuotaExceeded, match="balance"):
        c.generate("CCO", max_tokens=8)
    rows = _rows(pool, who)
    assert [(r.status, r.error_type, r.charge_su) for r in rows] == [(429, "QuotaExceeded", 0.0)] * 2
    (alloc,) = pool.access.allocations.show(project)
    assert alloc["reserved_su"] == 0 and alloc["balance_su"] == 1.0
    pool.access.allocations.topup(project, 10)  # a top-up takes effect at once
    with Client(pool.url, token=token) as c:
        assert c.generate("CCO", max_tokens=4, temperature=0.0).text is not None
    assert httpx.get(f"{pool.url}/health", timeout=10).json()["status"] == "ok"
    with pool.client() as admin:  # other projects are untouched
        admin.generate("CCO", max_tokens=4)


def test_a_failed_request_settles_with_what_it_used(pool: Any, priced: CostModel) -> None:
    project, who = _name("chem"), _name("sloppy")
    pool.access.allocations.create(project, 100)
    token = pool.add_principal(who, project, {"generate"})
    resp = httpx.post(  # longer than max_model_len: the replica refuses it
        f"{pool.url}/v1/completions",
        json={"prompt": "C" * 3000, "max_tokens": 8},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert resp.status_code == 400
    (row,) = _rows(pool, who)
    assert row.status == 400 and row.output_tokens == 0
    assert row.charge_su == pytest.approx(priced.charge_of(row))  # engine time only
    (alloc,) = pool.access.allocations.show(project)
    assert alloc["reserved_su"] == 0 and alloc["spent_su"] == pytest.approx(row.charge_su, abs=1e-6)
    assert alloc["available_su"] == pytest.approx(100 - row.charge_su, abs=1e-6)


# -- reservations that outlive their gateway ----------------------------------------------------


def _one(access: AccessDB, project: str) -> dict[str, Any]:
    (row,) = access.allocations.show(project)
    return row


def _held(access: AccessDB, project: str) -> list[Any]:
    """The project's rows in ``reservations``."""
    with access.engine.connect() as conn:
        return list(conn.execute(text("SELECT * FROM reservations WHERE project = :p"), {"p": project}).all())


def _crashed_gateway_reserves(access: AccessDB, project: str, who: str, su: float, expires_in: float) -> Any:
    """A reservation made by another gateway (its own engine) that then died without settling,
    expiring ``expires_in`` seconds from now (negative: already expired; made in the past, so no
    sweep needs a future clock: PostgreSQL's database is shared with other runs, whose live
    reservations must not be swept)."""
    gone = AccessDB(access.url)
    try:
        return gone.allocations.reserve(project, who, su, now=time.time() - 60, ttl_s=60 + expires_in)
    finally:
        gone.engine.dispose()


def test_a_crashed_gateways_reservation_is_released_once_expired(access: AccessDB) -> None:
    project, who = _name("proj"), _name("orphan")
    access.allocations.create(project, 10, starts=time.time() - 3600, caps={who: 8})
    live = _crashed_gateway_reserves(access, project, who, 1.5, expires_in=600)  # expires in 10 minutes
    dead = _crashed_gateway_reserves(access, project, who, 3.25, expires_in=-5)
    row = _one(access, project)
    assert row["reserved_su"] == 4.75 and row["available_su"] == 5.25 and row["caps"][who]["reserved_su"] == 4.75
    assert sorted(h.amount for h in _held(access, project)) == [to_micro(1.5), to_micro(3.25)]
    released = [r for r in access.allocations.sweep() if r["project"] == project]
    assert [(r["id"], r["su"], r["principal"]) for r in released] == [(dead.id, 3.25, who)]
    row = _one(access, project)
    assert row["reserved_su"] == 1.5 and row["available_su"] == 8.5 and row["spent_su"] == 0
    assert row["caps"][who]["reserved_su"] == 1.5
    assert [h.id for h in _held(access, project)] == [live.id]  # not yet expired: kept
    assert not [r for r in access.allocations.sweep() if r["project"] == project]  # nothing twice
    access.allocations.settle(live, 1.0)
    row = _one(access, project)
    assert (
        row["reserved_su"] == 0 and row["spent_su"] == 1.0 and row["balance_su"] == 9.0 and not _held(access, project)
    )


def test_concurrent_sweepers_release_each_expired_reservation_once(access: AccessDB) -> None:
    """Eight gateways (own engines) sweep at once: each expired reservation is released by one."""
    project, who = _name("proj"), _name("orphan")
    access.allocations.create(project, 100, starts=time.time() - 3600, caps={who: 90})
    dead = [_crashed_gateway_reserves(access, project, who, 1 + i / 7, expires_in=-5) for i in range(6)]
    assert _one(access, project)["reserved_su"] == pytest.approx(sum(d.su for d in dead))
    gateways = [AccessDB(access.url) for _ in range(8)]
    start = threading.Barrier(len(gateways))
    released: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def sweeper(db: AccessDB) -> None:
        start.wait()
        try:
            mine = [r for r in db.allocations.sweep() if r["project"] == project]
            with lock:
                released.extend(mine)
        except BaseException as exc:  # noqa: BLE001 - asserted in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=sweeper, args=(db,)) for db in gateways]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for db in gateways:
        db.engine.dispose()
    assert not errors, errors
    assert sorted(r["id"] for r in released) == sorted(d.id for d in dead)  # each once, none twice
    row = _one(access, project)
    assert row["reserved_su"] == 0 and row["available_su"] == 100 and row["caps"][who]["reserved_su"] == 0
    assert not _held(access, project)


def test_a_live_gateway_renews_its_reservation_so_no_sweep_takes_it(access: AccessDB) -> None:
    """A request that runs for several expiries (a long stream) keeps its reservation while its
    gateway renews; another gateway sweeping all along releases nothing until renewals stop.

    Both run on a clock the test steps (ttl/8 a step, four expiries in all), renewal and sweep of
    each step at the same moment on two threads: the race between the UPDATE and the DELETE is
    real, and a stall of the machine cannot pass for an expiry (it once could with real time)."""
    project, who = _name("proj"), _name("streamer")
    access.allocations.create(project, 10)
    ttl, t0 = 0.8, time.time()
    held = access.allocations.reserve(project, who, 2, now=t0, ttl_s=ttl)
    assert held is not None
    other = AccessDB(access.url)
    swept: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def at(now: float, work: Callable[[float], Any]) -> threading.Thread:
        def run() -> None:
            try:
                work(now)
            except BaseException as exc:  # noqa: BLE001 - asserted in the test's thread
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    for step in range(1, 33):
        now = t0 + step * ttl / 8
        renewal = at(now, lambda t: access.allocations.renew(now=t, margin_s=ttl))
        sweep = at(now, lambda t: swept.extend(r for r in other.allocations.sweep(now=t) if r["project"] == project))
        for thread in (renewal, sweep):
            thread.join(30)
    assert not errors and not swept, (errors, swept)
    assert _one(access, project)["reserved_su"] == 2
    expired = now + ttl + 0.1  # renewals stopped: expired now, yet its own gateway never sweeps it
    assert not [r for r in access.allocations.sweep(now=expired) if r["project"] == project]
    assert _one(access, project)["reserved_su"] == 2
    assert access.allocations.settle(held, 1.25) == 1.25
    row = _one(access, project)
    assert row["reserved_su"] == 0 and row["spent_su"] == 1.25 and not _held(access, project)
    other.engine.dispose()


def test_settling_after_a_sweep_spends_the_charge_without_releasing_twice(access: AccessDB) -> None:
    """A gateway cut off from the database for longer than the margin: its request's reservation
    was swept (and the SUs went to someone else) when it finally settles. The charge is still
    spent, as the ledger bills it; the reservation, already given back, is not given back again."""
    project, who, rival = _name("proj"), _name("stalled"), _name("rival")
    access.allocations.create(project, 10, starts=time.time() - 3600, caps={who: 8})
    stalled = AccessDB(access.url)  # the stalled gateway, alive again after the sweep
    late = stalled.allocations.reserve(project, who, 4, now=time.time() - 100, ttl_s=60)
    assert late is not None
    assert [r["id"] for r in access.allocations.sweep() if r["project"] == project] == [late.id]
    taken = access.allocations.reserve(project, rival, 6)  # the freed SUs are reserved again
    assert taken is not None
    assert stalled.allocations.settle(late, 2.5) == 2.5
    row = _one(access, project)
    assert row["reserved_su"] == 6 and row["spent_su"] == 2.5  # the rival's 6 untouched: not 6 - 4
    assert row["caps"][who]["reserved_su"] == 0 and row["caps"][who]["spent_su"] == 2.5
    assert row["available_su"] == 1.5
    access.allocations.settle(taken, 6)
    row = _one(access, project)
    assert row["reserved_su"] == 0 and row["spent_su"] == 8.5 and row["available_su"] == 1.5
    assert not _held(access, project)
    stalled.engine.dispose()


def test_settle_and_sweep_racing_release_once(access: AccessDB) -> None:
    """Expired reservations whose gateways settle them just as others sweep: whichever deletes the
    row gives the amount back, so ``reserved`` ends at exactly zero and every charge is spent."""
    project, who = _name("proj"), _name("racer")
    access.allocations.create(project, 100, starts=time.time() - 3600)
    owner = AccessDB(access.url)
    late = [owner.allocations.reserve(project, who, 2, now=time.time() - 100, ttl_s=60) for _ in range(6)]
    sweepers = [AccessDB(access.url) for _ in range(3)]
    start = threading.Barrier(1 + len(sweepers))
    errors: list[BaseException] = []

    def run(fn: Any) -> None:
        start.wait()
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - asserted in the test's thread
            errors.append(exc)

    settle_all = lambda: [owner.allocations.settle(r, 0.5) for r in late]  # noqa: E731
    threads = [threading.Thread(target=run, args=(settle_all,))]
    threads += [threading.Thread(target=run, args=(db.allocations.sweep,)) for db in sweepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for db in (owner, *sweepers):
        db.engine.dispose()
    assert not errors, errors
    row = _one(access, project)
    assert row["reserved_su"] == 0 and row["spent_su"] == 3.0 and row["available_su"] == 97.0
    assert not _held(access, project)


def test_an_older_database_gets_the_reservations_table_on_startup(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = AccessDB(url)
    with db.engine.begin() as conn:  # a database from before reservations were tracked
        conn.execute(text("DROP TABLE reservations"))
    db.engine.dispose()
    again = AccessDB(url)
    again.allocations.create("p", 5)
    held = again.allocations.reserve("p", "someone", 1)
    assert held is not None and again.allocations.settle(held, 0.5) == 0.5
    assert _one(again, "p")["reserved_su"] == 0 and _one(again, "p")["spent_su"] == 0.5


def test_the_sweep_command_releases_expired_reservations(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tpmflow.cli import app

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    db = AccessDB(url)
    db.allocations.create("p", 5, starts=time.time() - 3600)
    dead = _crashed_gateway_reserves(db, "p", "someone", 2, expires_in=-1)
    result = CliRunner().invoke(app, ["allocations", "sweep", "--json", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert [(r["id"], r["su"]) for r in json.loads(result.output)] == [(dead.id, 2.0)]
    assert _one(db, "p")["reserved_su"] == 0
    result = CliRunner().invoke(app, ["allocations", "sweep", "--database-url", url])
    assert result.exit_code == 0 and "released 0" in result.output, result.output


# -- streams through the real gateway ------------------------------------------------------------

# Long enough (seconds) and bigger than the sockets' buffers that the gateway is still relaying
# while the test looks at the allocation (the same shape as the mid-stream disconnect test).
_LONG_STREAM = {"max_tokens": 1000, "stream": True, "ignore_eos": True}


def _settled(pool: Any, project: str, who: str, timeout: float = 30) -> tuple[Any, dict[str, Any]]:
    """The request's ledger row and the allocation once the gateway settled (after the stream)."""
    deadline = time.monotonic() + timeout
    while True:
        alloc = _one(pool.access, project)  # first: a settled reservation means its row was completed
        rows = _rows(pool, who)
        if (rows and alloc["reserved_su"] == 0) or time.monotonic() > deadline:
            assert len(rows) == 1, rows
            return rows[0], alloc
        time.sleep(0.1)


def _funded_streamer(pool: Any, role: str) -> tuple[str, str, dict[str, str]]:
    """A fresh project with 10,000 SU and a principal of it: (project, principal, auth headers)."""
    project, who = _name("stream"), _name(role)
    pool.access.allocations.create(project, 10_000)
    token = pool.add_principal(who, project, {"generate"})
    return project, who, {"Authorization": f"Bearer {token}"}


def test_a_stream_holds_its_reservation_and_settles_to_its_charge(pool: Any, priced: CostModel) -> None:
    project, who, headers = _funded_streamer(pool, "reader")
    # ~20 MB of events, twice what the loopback buffers hold: the gateway cannot have relayed the
    # whole answer (and settled) while the test looks (with 4 x 1000, ~1 MB, a fast machine could)
    body = {"prompt": [f"stream {i}" for i in range(64)], **_LONG_STREAM}
    with httpx.stream("POST", f"{pool.url}/v1/completions", json=body, headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        mid = _one(pool.access, project)
        assert mid["reserved_su"] > 0 and mid["spent_su"] == 0  # reserved while streaming
        (held,) = _held(pool.access, project)
        assert held.expires >= time.time() + pool.cfg.gateway.request_timeout_s  # past its deadline + margin
        # Renewal of a live stream against any gateway's sweep is tested deterministically in
        # test_gateway_fast.py (a held-open fake stream): a real engine may finish before it runs.
        tail = [line for line in lines if line.startswith("data: ")]
    assert tail[-1] == "data: [DONE]"
    row, alloc = _settled(pool, project, who)
    assert row.status == 200 and row.output_tokens == 64 * 1000
    assert row.charge_su == pytest.approx(priced.charge_of(row), rel=1e-9) and row.charge_su > 0
    assert alloc["reserved_su"] == 0 and alloc["spent_su"] == pytest.approx(row.charge_su, abs=1e-6)
    assert not _held(pool.access, project)


def test_a_client_that_hangs_up_mid_stream_pays_for_what_it_got(pool: Any, priced: CostModel) -> None:
    """The answer is ~20 MB of events (64 x 1000 chunks), twice what the loopback socket buffers of
    both ends hold: the relay cannot read the replica's "[DONE]" before the client has read most of
    it, so the 5-line hang-up always comes first. (With 16 prompts, ~6 MB, a fast machine once
    generated and buffered the whole answer while the test thread waited for the GIL: a complete
    answer, rightly charged as one.)"""
    project, who, headers = _funded_streamer(pool, "quitter")
    body = {"prompt": [f"hang up {i}" for i in range(64)], **_LONG_STREAM}
    with httpx.stream("POST", f"{pool.url}/v1/completions", json=body, headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        got = 0
        for line in resp.iter_lines():
            got += line.startswith("data: {")
            if got == 5:
                assert _one(pool.access, project)["reserved_su"] > 0  # still streaming: reserved
                break  # leaving the iterator closes the connection: the client hangs up
    row, alloc = _settled(pool, project, who)
    assert row.status == 499 and row.error_type == "ClientDisconnected"
    assert 0 < row.output_tokens < 64 * 1000  # billed for the tokens it got, not the whole bound
    assert row.charge_su == pytest.approx(priced.charge_of(row), rel=1e-9) and row.charge_su > 0
    assert alloc["reserved_su"] == 0 and alloc["spent_su"] == pytest.approx(row.charge_su, abs=1e-6)
    assert not _held(pool.access, project)
