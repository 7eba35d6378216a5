"""Rate limits per principal and per service class: the token buckets on a clock the test moves,
then through a real gateway over the session pool's replicas (429 + Retry-After + ledger rows)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tpmflow.access import Principal
from tpmflow.config import GatewayConfig, PoolConfig, ServiceClass
from tpmflow.errors import QuotaExceeded
from tpmflow.gateway.ratelimit import Bucket, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _principal(name: str = "alice", service_class: str = "interactive") -> Principal:
    return Principal(name, "chem", frozenset({"generate"}), service_class, "salt")


def _limiter(**gateway: Any) -> tuple[RateLimiter, Clock]:
    cfg = PoolConfig(
        model="unused",
        gateway=GatewayConfig(**gateway),
        service_classes={
            "interactive": ServiceClass(),
            "batch": ServiceClass(priority=10, requests_per_minute=4, tokens_per_minute=100),
        },
    )
    clock = Clock()
    return RateLimiter(cfg, clock=clock), clock


def _admitted(limiter: RateLimiter, principal: Principal, n: int) -> list[bool]:
    out = []
    for _ in range(n):
        try:
            limiter.admit(principal)
            out.append(True)
        except QuotaExceeded:
            out.append(False)
    return out


# -- the buckets, on an injected clock -------------------------------------------------------------


def test_bucket_refills_continuously_up_to_its_capacity() -> None:
    b = Bucket(per_minute=6, level=0.0, updated=0.0)
    assert b.refill(10.0) == pytest.approx(1.0) and b.wait_s() == 0.0  # 6 per minute: 1 per 10 s
    b.level = -2.0
    assert b.wait_s() == pytest.approx(30.0)  # back to 1 after 3 units at 10 s each
    assert b.refill(1e6) == 6.0  # never above a minute's allowance


def test_unlimited_by_default() -> None:
    limiter, _ = _limiter()
    assert all(_admitted(limiter, _principal(), 1000))
    limiter.debit_tokens(_principal(), 10**9)
    assert all(_admitted(limiter, _principal(), 10))
    assert limiter.buckets == {}


def test_principal_requests_n_allowed_then_refused_then_refilled() -> None:
    limiter, clock = _limiter(principal_requests_per_minute=3)
    alice, bob = _principal("alice"), _principal("bob")
    assert _admitted(limiter, alice, 5) == [True, True, True, False, False]
    with pytest.raises(QuotaExceeded, match="principal 'alice' reached its limit of 3 requests per minute") as exc:
        limiter.admit(alice)
    assert exc.value.retry_after == pytest.approx(20.0) and exc.value.status_code == 429
    assert _admitted(limiter, bob, 3) == [True] * 3, "another principal has its own bucket"
    clock.now += 19.9
    assert _admitted(limiter, alice, 1) == [False]
    with pytest.raises(QuotaExceeded) as exc:
        limiter.admit(alice)
    assert exc.value.retry_after == pytest.approx(0.1)
    clock.now += 0.1
    assert _admitted(limiter, alice, 2) == [True, False]  # one refilled in 20 s
    clock.now += 3600
    assert _admitted(limiter, alice, 4) == [True, True, True, False]  # capacity stays 3


def test_class_limits_are_shared_and_a_refusal_takes_nothing() -> None:
    limiter, clock = _limiter(principal_requests_per_minute=3)
    a, b = _principal("a", "batch"), _principal("b", "batch")
    assert _admitted(limiter, a, 3) == [True] * 3
    # The class has 4 a minute: b gets the one left, then the class refuses b though b's own has 2.
    assert _admitted(limiter, b, 3) == [True, False, False]
    with pytest.raises(QuotaExceeded, match="class 'batch' reached its limit of 4 requests per minute"):
        limiter.admit(b)
    assert limiter.buckets[("requests", "principal", "b")].level == 2.0, "refused requests take nothing"
    clock.now += 15  # the class refills 1
    assert _admitted(limiter, b, 2) == [True, False]
    assert _admitted(limiter, _principal("c", "interactive"), 5) == [True] * 3 + [False] * 2


def test_tokens_admit_while_positive_and_debit_after() -> None:
    limiter, clock = _limiter(principal_tokens_per_minute=60)
    alice = _principal()
    limiter.admit(alice)
    limiter.debit_tokens(alice, 59)
    limiter.admit(alice)  # 1 left: still admitted
    limiter.debit_tokens(alice, 31)  # the answer was long: 30 in debt
    with pytest.raises(QuotaExceeded, match="principal 'alice' reached its limit of 60 tokens per minute") as exc:
        limiter.admit(alice)
    assert exc.value.retry_after == pytest.approx(31.0)  # 60 tokens a minute: back to 1 in 31 s
    clock.now += 30.5
    assert _admitted(limiter, alice, 1) == [True]  # 0.5 left is positive


def test_a_changed_limit_applies_to_the_existing_bucket() -> None:
    limiter, _ = _limiter(principal_requests_per_minute=10)
    alice = _principal()
    assert all(_admitted(limiter, alice, 2))
    limiter.cfg.gateway.principal_requests_per_minute = 3
    assert _admitted(limiter, alice, 4) == [True, True, True, False]  # the 8 left are clipped to the new 3


# -- through the real gateway ----------------------------------------------------------------------


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def limited(pool: Any, side_gateway: Any) -> Iterator[tuple[Any, str, Clock]]:
    """A second gateway over the session pool's replicas: 3 requests a minute per principal, class
    ``metered`` 12 tokens a minute, on a clock the test moves."""
    cfg = pool.cfg.model_copy(deep=True)
    cfg.gateway.principal_requests_per_minute = 3
    cfg.service_classes["metered"] = ServiceClass(priority=10, tokens_per_minute=12)
    with side_gateway(cfg) as (gw, url, _):
        clock = Clock()
        gw.rate_limits.clock = clock
        yield gw, url, clock


def _complete(url: str, token: str, max_tokens: int = 2) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": "tiny-llama", "prompt": "CCO", "max_tokens": max_tokens, "ignore_eos": True},
        headers={"Authorization": f"Bearer {token}"},
        timeout=60,
    )


def _rows(pool: Any, principal: str) -> list[Any]:
    pool.ledger.flush()
    return sorted(pool.access.ledger_rows(principal=principal), key=lambda r: r.created)


def test_three_requests_a_minute_through_the_gateway(pool: Any, limited: tuple[Any, str, Clock]) -> None:
    _, url, clock = limited
    alice, bob = _name("alice"), _name("bob")
    token, other = pool.add_principal(alice, _name("chem")), pool.add_principal(bob, _name("chem"))
    answers = [_complete(url, token) for _ in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429], [r.text for r in answers]
    for r in answers[3:]:
        assert r.headers["Retry-After"] == "20"  # 3 a minute: the next one in 20 s (frozen clock)
        error = r.json()["error"]
        assert error["type"] == "QuotaExceeded"
        assert f"principal {alice!r} reached its limit of 3 requests per minute" in error["message"]
    assert _complete(url, other).status_code == 200, "another principal is unaffected"
    clock.now += 20  # one request refills
    assert [_complete(url, token).status_code for _ in range(2)] == [200, 429]
    rows = _rows(pool, alice)
    assert [(r.status, r.error_type) for r in rows] == [(200, None)] * 3 + [(429, "RateLimited")] * 2 + [
        (200, None),
        (429, "RateLimited"),
    ]
    assert all(r.charge_su == 0.0 and r.replica_id is None for r in rows if r.status == 429)
    assert [(r.status, r.error_type) for r in _rows(pool, bob)] == [(200, None)]


def test_rate_limits_come_before_the_allocation(pool: Any, limited: tuple[Any, str, Clock]) -> None:
    """A project too poor for any request: its first 3 are refused by the allocation (each took a
    request from the bucket), the 4th by the rate limit — which therefore ran first and reserved nothing."""
    _, url, _ = limited
    project, who = _name("poor"), _name("student")
    pool.access.allocations.create(project, 1.0)
    token = pool.add_principal(who, project, {"generate"})
    answers = [_complete(url, token) for _ in range(4)]
    assert [r.status_code for r in answers] == [429] * 4
    assert "Retry-After" not in answers[0].headers, "a spent allocation is not helped by waiting"
    assert answers[3].headers["Retry-After"] == "20"
    assert [r.error_type for r in _rows(pool, who)] == ["QuotaExceeded"] * 3 + ["RateLimited"]
    (alloc,) = pool.access.allocations.show(project)
    assert alloc["reserved_su"] == 0 and alloc["balance_su"] == 1.0


def test_a_class_token_limit_refuses_once_the_tokens_are_spent(pool: Any, limited: tuple[Any, str, Clock]) -> None:
    _, url, clock = limited
    who = _name("metered")
    token = pool.add_principal(who, _name("chem"), {"generate"}, "metered")
    answers = []
    while not answers or answers[-1].status_code == 200:
        assert len(answers) < 3, "12 tokens a minute cannot cover three 6-token answers"
        answers.append(_complete(url, token, max_tokens=6))
    rows = _rows(pool, who)
    used = [r.prompt_tokens + r.output_tokens for r in rows if r.status == 200]
    assert all(r.output_tokens == 6 for r in rows if r.status == 200)
    # Admitted while tokens were left, refused exactly once they were spent (debited from the usage).
    assert sum(used[:-1]) < 12 <= sum(used)
    refused = answers[-1]
    assert refused.status_code == 429 and rows[-1].error_type == "RateLimited"
    assert "class 'metered' reached its limit of 12 tokens per minute" in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"] == str(math.ceil((1 - (12 - sum(used))) * 60 / 12))
    clock.now += 60 * 60  # an hour later the bucket is full again
    assert _complete(url, token, max_tokens=6).status_code == 200
