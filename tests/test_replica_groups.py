"""Service classes on replica groups: probe traffic on replicas of its own, vLLM priority scheduling
for interactive over batch, and groups scaled by queue depth, draining before they stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from tpmflow.config import PoolConfig, ReplicaGroup
from tpmflow.pool.autoscale import Decider, GroupLoad

# -- the scaling rule, on an injected clock -----------------------------------------------------------


def _decider(**kw: Any) -> Decider:
    group = ReplicaGroup(
        min_replicas=kw.pop("min", 1), max_replicas=kw.pop("max", 3), target_queue_per_replica=4.0, **kw
    ).sized(1)
    return Decider(group)


def test_scale_up_only_after_the_queue_stays_high() -> None:
    d = _decider(scale_up_after_s=5.0)
    assert d.decide(GroupLoad(1, 9, False), now=0.0) == 0  # 9 per replica > 4: pressure starts
    assert d.decide(GroupLoad(1, 9, False), now=4.9) == 0
    assert d.decide(GroupLoad(1, 3, False), now=5.0) == 0  # dipped: the clock restarts
    assert d.decide(GroupLoad(1, 9, False), now=6.0) == 0
    assert d.decide(GroupLoad(1, 9, False), now=11.0) == +1
    assert d.decide(GroupLoad(3, 30, False), now=100.0) == 0, "never above max"
    assert d.decide(GroupLoad(3, 30, False), now=200.0) == 0


def test_scale_down_only_when_the_rest_hold_the_queue_for_a_while() -> None:
    d = _decider(scale_down_after_s=60.0)
    assert d.decide(GroupLoad(2, 3, False), now=0.0) == 0  # 3 > half of 4 on one replica: stay
    assert d.decide(GroupLoad(2, 2, False), now=1.0) == 0  # 2 <= 2: quiet starts
    assert d.decide(GroupLoad(2, 2, False), now=60.9) == 0
    assert d.decide(GroupLoad(2, 0, False), now=61.0) == -1
    assert d.decide(GroupLoad(1, 0, False), now=1000.0) == 0, "never below min"


def test_a_group_scaled_to_zero_starts_one_as_soon_as_a_request_waits() -> None:
    d = _decider(min=0, max=1)
    assert d.decide(GroupLoad(0, 1, True), now=0.0) == +1
    assert d.decide(GroupLoad(1, 0, False), now=1.0) == 0
    assert d.decide(GroupLoad(1, 0, False), now=62.0) == -1


def test_group_configs_are_checked() -> None:
    with pytest.raises(ValidationError, match="names replica group 'gpu-probe', which is not defined"):
        PoolConfig(model="m", service_classes={"probe": {"replica_group": "gpu-probe"}})
    with pytest.raises(ValidationError, match=r"starts with 3 replicas, outside \[1, 2\]"):
        PoolConfig(model="m", replica_groups={"probe": {"replicas": 3, "min_replicas": 1, "max_replicas": 2}})
    with pytest.raises(ValidationError, match="needs `launcher.kind: local`"):
        PoolConfig(model="m", launcher={"kind": "parsl"}, replica_groups={"default": {"max_replicas": 2}})
    cfg = PoolConfig(model="m", replicas=2, replica_groups={"probe": {"replicas": 0, "max_replicas": 1}})
    assert [s.replica_id for s in cfg.slots()] == ["replica-0", "replica-1", "probe-0"]
    assert [s.replica_id for s in cfg.initial_slots()] == ["replica-0", "replica-1"]


def test_replicas_whole_process_trees_can_be_confined_to_cores(tmp_path: Path) -> None:
    """engine.process_cores: the replica and every child it starts run only on its cores (vLLM's
    CPU engine spin-waits; confined, a flooded replica cannot starve the gateway's core)."""
    import os
    import sys

    from tpmflow.pool.replica import ReplicaProcess, cpu_binds, process_cores

    cfg = PoolConfig(model="m", replicas=2, engine={"process_cores": ["0", "0-1"]})
    assert process_cores(cfg, 0) == {0} and process_cores(cfg, 1) == {0, 1}
    assert cpu_binds(cfg) == ["0", "0-1"], "OMP threads bound within the same cores"
    assert process_cores(PoolConfig(model="m"), 0) is None
    child = "import os, subprocess, sys; print(sorted(os.sched_getaffinity(0)), flush=True); subprocess.run([sys.executable, '-c', 'import os; print(sorted(os.sched_getaffinity(0)))'])"
    proc = ReplicaProcess("r", [sys.executable, "-c", child], dict(os.environ), tmp_path / "r.log", cores={0})
    proc.start()
    assert proc.proc is not None and proc.proc.wait(timeout=30) == 0
    assert (tmp_path / "r.log").read_text().split() == ["[0]", "[0]"], "the server and its children"


# -- a real pool: a default group that scales (1..2) and a probe group of its own ----------------------


@pytest.fixture(scope="module")
def grouped_pool(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tpmflow.config import GatewayConfig
    from tpmflow.payload import StoreConfig
    from tpmflow.pool import Pool

    root = tmp_path_factory.mktemp("groups")
    cfg = PoolConfig(
        model=str(tiny_model_dir),
        served_model_name="tiny-llama",
        replicas=1,
        # Thresholds no test load reaches: the tests scale by hand, deterministically.
        replica_groups={
            "default": {"min_replicas": 1, "max_replicas": 2, "target_queue_per_replica": 1000},
            "probe": {"replicas": 1},
        },
        service_classes={
            "interactive": {"priority": 0},
            "batch": {"priority": 10},
            "probe": {"priority": 5, "replica_group": "probe"},
        },
        # Two engines and the test on 2 cores can starve a busy replica's heartbeats for seconds; a
        # replica the gateway thought gone would hold the queued requests at the gateway, not in vLLM.
        gateway=GatewayConfig(request_timeout_s=120, heartbeat_timeout_s=30),
        store=StoreConfig(path=str(root / "store")),
        database_url=f"sqlite:///{root / 'access.db'}",
    )
    cfg.engine.max_model_len = 1024
    cfg.engine.max_num_seqs = 1  # one sequence at a time: the engine's waiting queue decides the order
    with Pool(cfg) as running:
        yield running


def _complete(
    pool: Any, token: str, max_tokens: int, client: httpx.Client | None = None, **extra: Any
) -> httpx.Response:
    body = {"model": "tiny-llama", "prompt": "C", "max_tokens": max_tokens, "ignore_eos": True, **extra}
    post = client.post if client is not None else httpx.post
    return post(f"{pool.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def _wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_each_class_runs_on_its_own_group(grouped_pool: Any) -> None:
    probe = grouped_pool.add_principal("probe-user", "interp", {"generate", "embed", "probe"}, "probe")
    interactive = grouped_pool.add_principal("chem-user", "chem", {"generate", "embed"}, "interactive")
    for token, replica in ((probe, "probe-0"), (interactive, "replica-0")):
        with grouped_pool.client(token) as client:
            assert {client.embed(["CCO"]).provenance["replica_id"] for _ in range(4)} == {replica}
            assert {_complete(grouped_pool, token, 2).headers["X-Tpmflow-Replica"] for _ in range(4)} == {replica}
    health = httpx.get(f"{grouped_pool.url}/health").json()
    assert {(r["id"], r["group"]) for r in health["replicas"]} == {("replica-0", "default"), ("probe-0", "probe")}


def _engine_queue(pool: Any, replica_url: str) -> tuple[int, int]:
    """Requests running and waiting in a replica's engine, from vLLM's Prometheus gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{replica_url}/metrics", headers={"Authorization": f"Bearer {pool.secret}"}, timeout=10).text
    totals = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return int(totals["vllm:num_requests_running"]), int(totals["vllm:num_requests_waiting"])


def test_interactive_overtakes_queued_batch_work(grouped_pool: Any) -> None:
    """vLLM's priority scheduling: with one sequence at a time, an interactive request overtakes the
    batch requests waiting in the engine's queue when it arrives.

    A long batch request holds the only sequence slot, 6 batch requests of 800 tokens queue behind
    it, then the interactive one is sent. How many batch requests were still waiting when it got
    there is read from the engine itself (vLLM's own gauges, sampled from the replica's /metrics
    once the gateway forwarded it), not assumed from timing: CI twice saw the interactive request
    finish last when the test assumed them. Where a sample shows every request not yet answered
    inside the engine (the interactive one included), each batch request waiting then must finish
    after it; the count may include the interactive request itself."""
    batch = grouped_pool.add_principal("sweeper", "chem", {"generate"}, "batch")
    interactive = grouped_pool.add_principal("steerer", "chem", {"generate"}, "interactive")
    replica = grouped_pool.gateway.registry.replicas["replica-0"]
    done: list[str] = []
    lock = threading.Lock()

    def run(name: str, token: str, max_tokens: int, client: httpx.Client | None = None) -> None:
        resp = _complete(grouped_pool, token, max_tokens, client=client)
        assert resp.status_code == 200, resp.text
        with lock:
            done.append(name)

    # The interactive request's connection is open (and its token known to the gateway) before the
    # queue builds: a new client, its TLS context and connection took 5-20 s to get a request out
    # while the engine spins on both cores of a small machine, long enough for every batch
    # request to be served first.
    fast_lane = httpx.Client(timeout=120)
    assert _complete(grouped_pool, interactive, 1, client=fast_lane).status_code == 200

    answered_before = replica.served

    def forwarded() -> int:  # to the replica so far: in flight there, or answered
        return replica.inflight + replica.served - answered_before

    holder = threading.Thread(target=run, args=("holder", batch, 1000))
    holder.start()
    _wait(lambda: forwarded() == 1, 30, "the long request at the replica")
    threads = [threading.Thread(target=run, args=(f"batch-{i}", batch, 800)) for i in range(6)]
    for t in threads:
        t.start()
    _wait(lambda: forwarded() == 7, 60, "6 batch requests forwarded behind it")
    time.sleep(0.2)  # from the gateway into the engine's queue
    first = threading.Thread(target=run, args=("interactive", interactive, 8, fast_lane))
    first.start()
    _wait(lambda: forwarded() == 8, 60, "the interactive request forwarded")
    samples: list[tuple[int, int, int]] = []  # (running, waiting) in the engine, and requests not yet answered
    while first.is_alive():
        with lock:
            outstanding = 8 - len(done)
        running, waiting = _engine_queue(grouped_pool, replica.info.url)
        with lock:
            if "interactive" not in done and 8 - len(done) == outstanding:
                samples.append((running, waiting, outstanding))
        time.sleep(0.05)
    for t in [holder, *threads]:
        t.join(timeout=180)
    fast_lane.close()
    assert sorted(done) == sorted(["holder", "interactive", *(f"batch-{i}" for i in range(6))])
    order = [name for name in done if name != "holder"]
    overtaken = len(order) - 1 - order.index("interactive")
    # Sent last, after all 6 were forwarded: first come, first served would finish it last.
    assert overtaken >= 1, f"the interactive request finished last: {done} (engine samples {samples})"
    # Where the engine's own gauges were read while every request not yet answered was in it (the
    # interactive one included: running + waiting counts them all; a loaded machine may answer the
    # /metrics poll only after it is done), every batch request waiting then finished after it (the
    # count may include the interactive request itself).
    waiting = max((w for r, w, out in samples if r + w == out), default=0)
    assert overtaken >= waiting - 1, (
        f"the interactive request finished {order.index('interactive') + 1}th of 7 though the engine "
        f"had {waiting} waiting when it arrived (running, waiting as sampled: {samples}): {done}"
    )


def test_a_scaled_down_replica_drains_without_failing_requests(grouped_pool: Any) -> None:
    scaler, registry = grouped_pool.autoscaler, grouped_pool.gateway.registry
    token = grouped_pool.add_principal("drain-user", "chem", {"generate"}, "interactive")
    assert scaler.scale_up("default") == "replica-1"
    _wait(lambda: "replica-1" in {r.info.replica_id for r in registry.live("default")}, 180, "replica-1 to join")
    results: list[tuple[int, str]] = []
    during: list[tuple[int, str]] = []
    lock = threading.Lock()

    def run(max_tokens: int, out: list[tuple[int, str]]) -> None:
        resp = _complete(grouped_pool, token, max_tokens)
        with lock:
            out.append((resp.status_code, resp.headers.get("X-Tpmflow-Replica", "")))

    # 400 tokens each, one sequence at a time per engine: each replica stays busy for seconds
    first = [threading.Thread(target=run, args=(400, results)) for _ in range(6)]
    for t in first:
        t.start()
    _wait(lambda: all(registry.replicas[r].inflight > 0 for r in ("replica-0", "replica-1")), 30, "load on both")
    victim = scaler.scale_down("default")
    assert victim in ("replica-0", "replica-1")
    had = registry.replicas[victim].inflight
    assert had > 0, "the drained replica was busy when it left the rotation"
    later = [threading.Thread(target=run, args=(4, during)) for _ in range(6)]  # sent while it drains
    for t in later:
        t.start()
    for t in [*first, *later]:
        t.join(timeout=180)
    assert [s for s, _ in results + during] == [200] * 12, (results, during)
    survivor = ({"replica-0", "replica-1"} - {victim}).pop()
    assert sum(r == victim for _, r in results) >= had, "its in-flight requests were answered by it"
    assert {r for _, r in during} == {survivor}, "nothing new went to the draining replica"
    _wait(lambda: victim not in registry.replicas, 60, "the drained replica to stop")
    assert grouped_pool.launcher.group_ids("default") == [survivor]
    assert not grouped_pool.launcher.replicas.get(victim)
    assert scaler.scale_down("default") is None, "the group is at its minimum"
    assert _complete(grouped_pool, token, 2).headers["X-Tpmflow-Replica"] == survivor
