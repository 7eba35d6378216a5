"""Service classes under load: does a low-priority batch flood push interactive traffic past its
SLO? Measured side by side in one run (prints one JSON line; tables on stderr).

One pool (tiny model): a default group of 1 replica (``--max-num-seqs`` sequences at once, so a
flood fills the engine and requests wait in its queue, where vLLM's priorities act) and a ``probe``
group of 1 replica. Service classes: ``interactive`` (priority 0, TTFT and latency p95 targets),
``batch`` (priority 10, a tokens/s target), ``batch-nopriority`` (the same flood at priority 0: what
priority scheduling buys), ``probe`` (its own replica group), ``metered`` (see the last phase).
One principal per class. Three load phases, each bounded by ``--requests`` interactive requests and
``--phase-s`` seconds (flood and probes stop with the interactive stream, then in-flight requests
get ``--drain-s`` to finish):

1. ``no flood``: interactive at ``--rate`` req/s (open loop, every other one streamed, so TTFT and
   latency differ) + probes at ``--probe-rate``;
2. ``flood``: the same + ``--flood`` concurrent ``batch`` generations of 64-128 tokens (ignore_eos);
3. ``flood, no priority``: the same flood from ``batch-nopriority``.

The SLO report per phase is ``tpmflow.access.slo.slo_report`` over the ledger rows of its window.
A fourth phase measures what admission + accounting cost per request (max_tokens=1, one at a time,
two principals alternating): a project with an allocation (reserve + settle in the database) and
class rate limits vs a project with neither. Outputs: ``report.json`` and ``latency.png`` (p50/p95
per class in 2 s bins, phases shaded) in ``--out``.

The load runs in a child process, so the client's Python does not share the gateway's GIL. It also
times ``/health`` 4 times a second: no engine is behind it, so when it is slow the node starved the
gateway (or this client) of CPU, whatever the classes' priorities (printed per phase).

Usage: python bench/load.py [--phase-s 25] [--requests 100] [--rate 4] [--flood 24] [--out runs/bench_load]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
LOAD_CLASSES = ("interactive", "batch", "batch-nopriority", "probe")


@dataclass(frozen=True)
class PhaseSpec:
    """One load phase. The interactive stream ends after ``requests`` or ``seconds``, whichever first."""

    name: str
    seconds: float
    requests: int
    rate: float  # interactive requests per second, open loop (arrivals do not wait for answers)
    interactive_tokens: int
    flood_class: str | None  # which principal floods; None: no flood
    flood: int  # concurrent flood generations (closed loop: each sends the next when answered)
    probe_rate: float
    drain_s: float  # then in-flight requests get this long before they are cancelled
    seed: int = 0


@dataclass
class PhaseResult:
    """What the client saw (the SLO figures come from the ledger); wall-clock window in epoch seconds."""

    name: str
    since: float
    until: float
    sent: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # why, per class (and cancelled at the drain bound)
    # /health round trips, 4 a second: no engine behind it, so a slow one means the gateway's (or
    # this client's) process stalled, not the scheduling of the classes.
    health_ms: list[float] = field(default_factory=list)


# -- the load generator (runs in the child process) ---------------------------------------------------


async def _complete(
    http: httpx.AsyncClient, url: str, token: str, prompt: str, max_tokens: int, stream: bool
) -> str | None:
    """One ``/v1/completions`` call; a stream is read to its end, as a client reading tokens would.
    Returns None when answered, else why not."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,  # fixed lengths, so latencies compare across phases
        "temperature": 0.0,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {token}"}
    try:
        if stream:
            async with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as resp:
                async for _ in resp.aiter_bytes():
                    pass
        else:
            resp = await http.post(url + "/v1/completions", json=body, headers=headers)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return None if resp.status_code == 200 else f"HTTP {resp.status_code}"


async def _load(url: str, tokens: dict[str, str], spec: PhaseSpec, result: PhaseResult) -> None:
    """One phase: the flood in a closed loop (it fills the engine whatever the answers' pace), the
    interactive, probe and /health streams in an open loop (arrivals on a clock, as users send)."""
    from tpmflow.client import AsyncClient
    from tpmflow.schema import Capture

    rng = random.Random(spec.seed)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def count(cls: str, error: str | None) -> None:
        result.sent[cls] += 1
        if error is not None:
            result.failed[cls] += 1
            result.errors[f"{cls}: {error}"] += 1

    async def interactive(i: int) -> None:
        prompt = f"interactive {spec.name} {i}: the next step is"
        stream = i % 2 == 1  # every other one streamed: its TTFT is its first chunk, not its whole answer
        count("interactive", await _complete(http, url, tokens["interactive"], prompt, spec.interactive_tokens, stream))

    async def flood_worker(w: int) -> None:
        assert spec.flood_class is not None
        i = 0
        while not stop.is_set():
            prompt = f"batch {spec.name} {w}.{i}: sweep the parameter space"
            error = await _complete(http, url, tokens[spec.flood_class], prompt, rng.randint(64, 128), stream=False)
            count(spec.flood_class, error)
            i += 1

    async def probe(i: int) -> None:
        try:
            await prober.probe(f"probe {i}: residual stream", capture=[Capture(site="hook_resid_post", layers=[1])])
            count("probe", None)
        except Exception as exc:  # noqa: BLE001 - a failed probe is a data point, not the end of the bench
            count("probe", type(exc).__name__)

    async def health(i: int) -> None:
        started = time.perf_counter()
        with contextlib.suppress(httpx.HTTPError):
            await http.get(url + "/health")
            result.health_ms.append((time.perf_counter() - started) * 1000)

    async def paced(rate: float, n: int | None, make: Callable[[int], Coroutine[Any, Any, None]]) -> None:
        """Start ``make(i)`` at ``rate`` per second until ``n`` are started or the phase's time is up."""
        loop = asyncio.get_running_loop()
        start, i = loop.time(), 0
        while (n is None or i < n) and not stop.is_set():
            at = start + i / rate
            if at - start >= spec.seconds:
                break
            await asyncio.sleep(max(0.0, at - loop.time()))
            tasks.append(asyncio.create_task(make(i)))
            i += 1

    # Idle connections expire before uvicorn's 5 s keep-alive, so none is reused as the gateway closes it.
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512, keepalive_expiry=2.0)
    async with (
        httpx.AsyncClient(timeout=120, limits=limits) as http,
        AsyncClient(url, tokens["probe"], retries=0) as prober,
    ):
        workers = [asyncio.create_task(flood_worker(w)) for w in range(spec.flood if spec.flood_class else 0)]
        if workers:
            await asyncio.sleep(2.0)  # the flood fills the engine before interactive requests arrive
        side = [asyncio.create_task(paced(4.0, None, health))]
        if spec.probe_rate > 0:
            side.append(asyncio.create_task(paced(spec.probe_rate, None, probe)))
        await paced(spec.rate, spec.requests, interactive)
        stop.set()
        await asyncio.gather(*side)
        _, late = await asyncio.wait(tasks + workers, timeout=spec.drain_s)
        for task in late:  # past the drain bound: give up on them (the gateway records a 499)
            task.cancel()
        if late:
            result.errors["cancelled at the drain bound"] += len(late)
        await asyncio.gather(*late, return_exceptions=True)


def run_phase(url: str, tokens: dict[str, str], spec: PhaseSpec) -> PhaseResult:
    """Entry point of the child process: one phase, from first request to last answer."""
    result = PhaseResult(spec.name, since=time.time(), until=0.0)
    asyncio.run(_load(url, tokens, spec, result))
    result.until = time.time()
    return result


async def _cheap_calls(url: str, tokens: dict[str, str], n: int, seconds: float) -> dict[str, list[float]]:
    """``n`` max_tokens=1 calls per principal (fewer if ``seconds`` run out), alternating and one at
    a time, so drift on a busy machine hits both alike and no request waits for another.
    Client-side milliseconds."""
    out: dict[str, list[float]] = {name: [] for name in tokens}
    body = {"model": MODEL, "prompt": "admission", "max_tokens": 1}
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60) as http:
        for i in range(n * len(tokens)):
            if time.monotonic() > deadline:
                break
            name = list(tokens)[i % len(tokens)]
            t0 = time.perf_counter()
            resp = await http.post(
                url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {tokens[name]}"}
            )
            resp.raise_for_status()
            out[name].append((time.perf_counter() - t0) * 1000)
    return out


def run_cheap_calls(
    url: str, tokens: dict[str, str], n: int, seconds: float
) -> tuple[float, float, dict[str, list[float]]]:
    """Entry point of the child process for phase 4: its window and the client's milliseconds."""
    since = time.time()
    client_ms = asyncio.run(_cheap_calls(url, tokens, n, seconds))
    return since, time.time(), client_ms


# -- the pool and the report (the parent process) ------------------------------------------------------


def _pool_config(args: argparse.Namespace, root: Path) -> Any:
    from tpmflow.config import EngineConfig, GatewayConfig, PoolConfig, ReplicaGroup, ServiceClass
    from tpmflow.models.catalog import model_path
    from tpmflow.payload import StoreConfig

    return PoolConfig(
        model=str(model_path(args.model)),
        served_model_name=MODEL,
        replicas=1,
        replica_groups={"probe": ReplicaGroup(replicas=1)},
        service_classes={
            "interactive": ServiceClass(priority=0, ttft_p95_ms=args.ttft_p95_ms, latency_p95_ms=args.latency_p95_ms),
            "batch": ServiceClass(priority=10, min_tokens_per_s=args.batch_tokens_per_s),
            "batch-nopriority": ServiceClass(priority=0, min_tokens_per_s=args.batch_tokens_per_s),
            "probe": ServiceClass(priority=5, replica_group="probe", latency_p95_ms=args.probe_p95_ms),
            # Limits no run reaches: the point is their cost on every admission, not refusals.
            "metered": ServiceClass(priority=0, requests_per_minute=1e6, tokens_per_minute=1e9),
        },
        engine=EngineConfig(max_model_len=512, max_num_seqs=args.max_num_seqs, process_cores=args.replica_cores),
        gateway=GatewayConfig(request_timeout_s=120, max_inflight=64, queue_limit=512),
        store=StoreConfig(path=str(root / "store")),
        database_url=f"sqlite:///{root / 'access.db'}",
        parts_path=str(root / "parts"),
    )


def _split_cores(gateway_cores: int) -> list[str] | None:
    """Pin this process (the gateway; the load generator it spawns inherits it) to the first
    ``gateway_cores`` cores and return the rest for the replicas, or None when not pinning.

    vLLM's CPU engine spin-waits between steps: a flooded replica sharing the gateway's cores
    starves the gateway itself, and no scheduling priority can give that CPU back."""
    cores = sorted(os.sched_getaffinity(0))
    if gateway_cores <= 0 or len(cores) <= gateway_cores:
        return None
    os.sched_setaffinity(0, cores[:gateway_cores])
    rest = cores[gateway_cores:]
    return [",".join(str(c) for c in rest)]


def _wait_for(executor: ProcessPoolExecutor, what: str, expect_s: float, hard_s: float, fn: Any, *fn_args: Any) -> Any:
    """Run ``fn`` in the load process with a progress bar over the time it should take; past
    ``hard_s`` give up (leaving the ``with`` stops the pool, which ends the load's requests)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    future = executor.submit(fn, *fn_args)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task(what, total=expect_s)
        started = time.monotonic()
        while not future.done():
            elapsed = time.monotonic() - started
            if elapsed > hard_s:
                raise TimeoutError(f"{what} ran past its bound of {hard_s:.0f} s")
            bar.update(task, completed=min(expect_s, elapsed))
            time.sleep(0.25)
    return future.result()


def _bound(spec: PhaseSpec) -> float:
    """The longest a phase can take: flood ramp, interactive stream, drain, and slack for cancelling."""
    return 2 + spec.seconds + spec.drain_s + 30


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def _gateway_ms(engine: Any, since: float, until: float, principals: dict[str, str]) -> dict[str, list[float]]:
    """Gateway time per answered request outside the engine, from the ledger: ``latency_ms - engine_ms``.

    latency_ms runs from the Call's creation (after authentication, which is cached for 2 s) to the
    ledger row; engine_ms from sending to the replica to its answer read. The difference is what the
    gateway spends on the request path: reading and validating the body, rate limits, the
    allocation's reservation (one transaction in a thread: a conditional UPDATE and the
    reservation's row), the admission queue, picking a replica, encoding the forwarded body and
    decoding the answer. It leaves out authentication, settling the reservation (after the row,
    before the answer leaves) and the ledger write (batched off the request path); the client's
    round trip includes all of them.
    """
    from sqlalchemy import select

    from tpmflow.access.tables import LedgerEntry

    query = select(LedgerEntry.principal, LedgerEntry.latency_ms, LedgerEntry.engine_ms).where(
        LedgerEntry.created >= since,
        LedgerEntry.created < until,
        LedgerEntry.status == 200,
        LedgerEntry.principal.in_(list(principals.values())),
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return {
        label: [r.latency_ms - r.engine_ms for r in rows if r.principal == principal]
        for label, principal in principals.items()
    }


def _retried(engine: Any, since: float, until: float) -> int:
    """Attempts the gateway made again on a replica (after a dropped connection): the client saw
    only the retry, so the SLO report leaves the failed attempt out; counted here to show them."""
    from sqlalchemy import func, select

    from tpmflow.access.tables import LedgerEntry

    query = select(func.count()).where(
        LedgerEntry.created >= since, LedgerEntry.created < until, LedgerEntry.retry_of.is_not(None)
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _plot(engine: Any, phases: list[PhaseResult], path: Path, bin_s: float, targets: dict[str, float]) -> None:
    """p50 (dashed) and p95 (solid) latency of answered requests per class, in ``bin_s`` bins of
    their ledger ``created`` time, phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sqlalchemy import select

    from tpmflow.access.tables import LedgerEntry

    t0, t1 = phases[0].since, phases[-1].until
    query = select(LedgerEntry.service_class, LedgerEntry.created, LedgerEntry.latency_ms).where(
        LedgerEntry.created >= t0,
        LedgerEntry.created < t1,
        LedgerEntry.status == 200,
        LedgerEntry.service_class.in_(LOAD_CLASSES),
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, phase in enumerate(phases):
        ax.axvspan(phase.since - t0, phase.until - t0, color=f"C{i}", alpha=0.08)
        ax.text(phase.since - t0 + 0.5, 1.02, phase.name, transform=ax.get_xaxis_transform(), fontsize=9)
    for k, cls in enumerate(LOAD_CLASSES):
        points = [(r.created - t0, r.latency_ms) for r in rows if r.service_class == cls]
        if not points:
            continue
        bins: dict[int, list[float]] = {}
        for t, ms in points:
            bins.setdefault(int(t // bin_s), []).append(ms)
        xs = sorted(bins)
        centres = [(b + 0.5) * bin_s for b in xs]
        ax.plot(centres, [np.percentile(bins[b], 95) for b in xs], color=f"C{k + 3}", label=f"{cls} p95")
        ax.plot(centres, [np.percentile(bins[b], 50) for b in xs], color=f"C{k + 3}", ls="--", label=f"{cls} p50")
    for name, ms in targets.items():
        ax.axhline(ms, color="k", ls=":", lw=1)
        ax.text(0.5, ms, f" {name} {ms:g} ms", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel(f"seconds since the first phase began (ledger `created`, {bin_s:g} s bins)")
    ax.set_ylabel("latency at the gateway (ms)")
    ax.legend(fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _slo_table(reports: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title="SLO per phase and class (ledger, gateway-side ms)")
    for col in ("phase", "class", "reqs", "fail", "TTFT p50/p95/p99", "latency p50/p95/p99", "tok/s", "SLO"):
        table.add_column(col, justify="left" if col in ("phase", "class", "SLO") else "right")
    for phase, report in reports.items():
        for c in report.classes:
            if c.requests == 0:
                continue
            checks = ", ".join(f"{k.name} {_fmt(k.measured)}/{k.target:g} {k.verdict.upper()}" for k in c.checks)
            style = {"met": "green", "missed": "red"}.get(c.verdict, "")
            table.add_row(
                phase,
                c.service_class,
                str(c.requests),
                str(c.failed + c.throttled),
                " / ".join(_fmt(v) for v in (c.ttft_ms.p50, c.ttft_ms.p95, c.ttft_ms.p99)),
                " / ".join(_fmt(v) for v in (c.latency_ms.p50, c.latency_ms.p95, c.latency_ms.p99)),
                _fmt(c.tokens_per_s),
                f"[{style}]{c.verdict.upper()}[/{style}]" + (f" ({checks})" if checks else ""),
            )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--phase-s", type=float, default=25.0, help="most seconds of interactive traffic per phase")
    parser.add_argument("--requests", type=int, default=100, help="most interactive requests per phase")
    parser.add_argument("--rate", type=float, default=4.0, help="interactive requests per second")
    parser.add_argument("--interactive-tokens", type=int, default=16)
    parser.add_argument("--flood", type=int, default=24, help="concurrent batch generations")
    parser.add_argument("--probe-rate", type=float, default=1.0, help="probe requests per second")
    parser.add_argument("--warmup-s", type=float, default=6.0, help="the whole mix, before the phases")
    parser.add_argument("--drain-s", type=float, default=30.0, help="bound on finishing in-flight work per phase")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="sequences each engine runs at once")
    parser.add_argument("--cheap-calls", type=int, default=200, help="max_tokens=1 calls per principal (phase 4)")
    parser.add_argument("--ttft-p95-ms", type=float, default=500.0)
    parser.add_argument("--latency-p95-ms", type=float, default=1000.0)
    parser.add_argument("--batch-tokens-per-s", type=float, default=500.0)
    parser.add_argument("--probe-p95-ms", type=float, default=500.0)
    parser.add_argument("--bin-s", type=float, default=2.0, help="plot bins")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_load")
    parser.add_argument(
        "--gateway-cores",
        type=int,
        default=1,
        help="cores kept for the gateway and the load generator; replicas' whole process trees get "
        "the rest (engine.process_cores). 0: no pinning, everything shares every core",
    )
    args = parser.parse_args()
    args.replica_cores = _split_cores(args.gateway_cores)

    from rich.console import Console

    from tpmflow.access.slo import slo_report
    from tpmflow.pool import Pool

    # Wide enough for the table when stderr is a file or a pipe (rich would assume 80 columns).
    console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)
    # Every figure here is CPU time shared on a small node: a busy machine moves them all.
    load_before = os.getloadavg()[0]
    console.print(f"1-minute load average before the pool starts: {load_before:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    spawn = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="tpmflow-bench-load-") as root,  # the ledger and store of this run
        ProcessPoolExecutor(max_workers=1, mp_context=spawn) as executor,
        Pool(_pool_config(args, Path(root))) as pool,
    ):
        cfg = pool.cfg
        console.print(f"pool up in {time.monotonic() - started:.0f} s: {pool.url}")
        tokens = {
            "interactive": pool.add_principal("steerer", "chem", {"generate"}, "interactive"),
            "batch": pool.add_principal("sweeper", "chem", {"generate"}, "batch"),
            "batch-nopriority": pool.add_principal("sweeper-nopriority", "chem", {"generate"}, "batch-nopriority"),
            "probe": pool.add_principal("interp", "interp", {"generate", "probe"}, "probe"),
        }
        # Phase 4's pair: "metered" draws on an allocation (with a cap) and has class rate limits;
        # "plain" (class interactive, project without an allocation) has neither.
        pool.access.allocations.create("granted", su=1e6, caps={"metered-user": 1e5})
        cheap = {
            "plain": pool.add_principal("plain-user", "open", {"generate"}, "interactive"),
            "metered": pool.add_principal("metered-user", "granted", {"generate"}, "metered"),
        }
        alone = PhaseSpec(
            "no flood",
            seconds=args.phase_s,
            requests=args.requests,
            rate=args.rate,
            interactive_tokens=args.interactive_tokens,
            flood_class=None,
            flood=args.flood,
            probe_rate=args.probe_rate,
            drain_s=args.drain_s,
        )
        # Warm up with the whole mix: an engine's first batches of a new size run slower.
        warmup = replace(alone, name="warm-up", seconds=args.warmup_s, flood_class="batch")
        _wait_for(executor, "warm-up", warmup.seconds + 2, _bound(warmup), run_phase, pool.url, tokens, warmup)
        specs = [
            alone,
            replace(alone, name="flood", flood_class="batch"),
            replace(alone, name="flood, no priority", flood_class="batch-nopriority"),
        ]
        phases: list[PhaseResult] = []
        for spec in specs:
            phases.append(
                _wait_for(executor, spec.name, spec.seconds + 2, _bound(spec), run_phase, pool.url, tokens, spec)
            )
            time.sleep(0.5)  # a gap, so no phase's window holds another's rows
        cheap_since, cheap_until, client_ms = _wait_for(
            executor,
            "admission cost",
            10,
            args.phase_s + 60,
            run_cheap_calls,
            pool.url,
            cheap,
            args.cheap_calls,
            args.phase_s,
        )
        pool.ledger.flush()
        engine = pool.access.engine
        classes = {name: cfg.service_classes[name] for name in LOAD_CLASSES}
        reports = {p.name: slo_report(engine, classes, p.since, p.until) for p in phases}
        gateway_ms = _gateway_ms(engine, cheap_since, cheap_until, {"plain": "plain-user", "metered": "metered-user"})
        retries = {p.name: _retried(engine, p.since, p.until) for p in phases}
        targets = {"interactive latency p95": args.latency_p95_ms, "interactive TTFT p95": args.ttft_p95_ms}
        _plot(engine, phases, args.out / "latency.png", args.bin_s, targets)

    load_after = os.getloadavg()[0]
    console.print(_slo_table(reports))
    for p in phases:
        health = "/".join(f"{_pct(p.health_ms, q):,.0f}" for q in (50, 95, 100))
        console.print(
            f"{p.name}: {p.until - p.since:.1f} s; client sent {dict(p.sent)}, errors {dict(p.errors) or 'none'}; "
            f"gateway retries {retries[p.name]}; gateway /health ms p50/p95/max {health}"
        )
    admission = _admission_summary(gateway_ms, client_ms)
    console.print(f"admission + accounting, ms per max_tokens=1 request: {json.dumps(admission)}")
    console.print(f"1-minute load average after the run: {load_after:.2f}")

    def interactive_p95_ratio(phase: str) -> float | None:
        alone, loaded = reports["no flood"].of("interactive"), reports[phase].of("interactive")
        return _ratio(loaded.latency_ms.p95, alone.latency_ms.p95)

    result: dict[str, Any] = {
        "bench": "load",
        "phase_s": args.phase_s,
        "rate": args.rate,
        "flood": args.flood,
        "max_num_seqs": args.max_num_seqs,
        "gateway_cores": args.gateway_cores,
        "replica_cores": args.replica_cores,
        "load_avg_before_after": [round(load_before, 2), round(load_after, 2)],
        "targets": {
            "interactive": {"ttft_p95_ms": args.ttft_p95_ms, "latency_p95_ms": args.latency_p95_ms},
            "batch": {"min_tokens_per_s": args.batch_tokens_per_s},
            "probe": {"latency_p95_ms": args.probe_p95_ms},
        },
        "phases": {p.name: _summary(reports[p.name]) for p in phases},
        "health_ms_p50_p95_max": {p.name: [round(_pct(p.health_ms, q), 1) for q in (50, 95, 100)] for p in phases},
        "interactive_latency_p95_flood_over_alone": interactive_p95_ratio("flood"),
        "interactive_latency_p95_nopriority_over_alone": interactive_p95_ratio("flood, no priority"),
        "admission": admission,
    }
    report_json = {
        "result": result,
        "slo": {name: r.model_dump() for name, r in reports.items()},
        "windows": {p.name: [p.since, p.until] for p in phases},
        "client": {
            p.name: {"sent": p.sent, "failed": p.failed, "errors": p.errors, "health_ms": p.health_ms} for p in phases
        },
        "gateway_retries": retries,
    }
    (args.out / "report.json").write_text(json.dumps(report_json, indent=2))
    console.print(
        f"wrote {args.out / 'report.json'} and {args.out / 'latency.png'} in {time.monotonic() - started:.0f} s"
    )
    print(json.dumps(result))


def _summary(report: Any) -> dict[str, Any]:
    """The JSON line's figures of one phase: per class with requests, p50/p95/p99 and the verdict."""

    def rounded(p: Any) -> list[float | None]:
        return [None if v is None else round(v, 1) for v in (p.p50, p.p95, p.p99)]

    return {
        c.service_class: {
            "requests": c.requests,
            "failed": c.failed,
            "ttft_ms": rounded(c.ttft_ms),
            "latency_ms": rounded(c.latency_ms),
            "tokens_per_s": None if c.tokens_per_s is None else round(c.tokens_per_s, 1),
            "verdict": c.verdict,
        }
        for c in report.classes
        if c.requests
    }


def _admission_summary(gateway_ms: dict[str, list[float]], client_ms: dict[str, list[float]]) -> dict[str, Any]:
    """p50/p99 per principal of the gateway's own time (ledger) and the round trip (client), and
    metered minus plain: what an allocation and rate limits add to a request."""
    out: dict[str, Any] = {
        label: {
            "gateway_ms_p50": round(_pct(gateway_ms[label], 50), 2),
            "gateway_ms_p99": round(_pct(gateway_ms[label], 99), 2),
            "client_ms_p50": round(_pct(client_ms[label], 50), 2),
            "client_ms_p99": round(_pct(client_ms[label], 99), 2),
        }
        for label in ("plain", "metered")
    }
    out["metered_minus_plain"] = {k: round(out["metered"][k] - out["plain"][k], 2) for k in out["plain"]}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


if __name__ == "__main__":
    main()
