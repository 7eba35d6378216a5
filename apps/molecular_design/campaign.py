"""The TPM-steered molecular design campaign: four arms, same budget, same simulations.

    python -m apps.molecular_design.campaign --seeds 0 1 2 --budget 48 --out runs/molecular_design

One process holds the pool (gateway + vLLM replicas of the demo SMILES model), a Colmena
``ParslTaskServer`` (simulations on a local HTEX, the pool's calls as tasks on a thread
executor) and, one after another, a ``DesignThinker`` per (seed, arm). Outputs in ``--out``:
``campaign.json`` (who runs it, from when: the workbench shows it live), ``simulations.csv`` (every
simulation, failures included), ``best_found.png``, ``run.json``
(model content hash, adapter version, seeds, settings, ledger usage totals) and a printed summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from apps.molecular_design.library import fingerprints, load_library
from apps.molecular_design.thinker import ARMS, Arm, DesignThinker, Settings

REPO = Path(__file__).resolve().parents[2]
CSV_FIELDS = [
    "arm", "seed", "index", "smiles", "source", "objective", "dipole_debye", "heavy_atoms",
    "energy_kcal", "error", "seconds", "task_seconds", "worker",
]  # fmt: skip


def task_server_config(run_dir: Path) -> Any:
    """Simulations on a local HTEX (one worker: the replicas have the other core); the pool's
    calls on threads, since a ``tpm_*`` task only waits for the pool."""
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor
    from parsl.providers import LocalProvider

    return Config(
        executors=[
            HighThroughputExecutor(
                label="sim", max_workers_per_node=1, provider=LocalProvider(init_blocks=1, max_blocks=1)
            ),
            ThreadPoolExecutor(label="tpm", max_threads=4),
        ],
        run_dir=str(run_dir / "runinfo"),
        retries=1,
    )


def start_pool(out: Path, replicas: int, model: str | None) -> Any:
    from tpmflow.config import PoolConfig
    from tpmflow.pool import Pool
    from tpmflow.pool.launch import free_port

    cfg = PoolConfig.from_yaml(REPO / "configs" / "local.yaml")
    cfg.replicas = replicas
    cfg.model = model or cfg.model
    cfg.gateway.port = free_port()
    cfg.database_url = f"sqlite:///{out / 'ledger.db'}"
    cfg.store.path = str(out / "store")
    cfg.gateway.campaign_dirs = [str(out)]  # the workbench's Campaigns page shows this run live
    pool = Pool(cfg)
    pool.start()
    return pool


def embed_library(client: Any, library: list[str], progress: Progress) -> dict[str, np.ndarray]:
    """Every candidate's pooled final hidden state from the pool (embed mode, SMILES adapter)."""
    task = progress.add_task("embedding the library through the pool", total=len(library))
    vectors: dict[str, np.ndarray] = {}
    for start in range(0, len(library), 256):
        chunk = library[start : start + 256]
        emb = client.embed(chunk, adapter="smiles")
        for i in emb.ok:
            vectors[chunk[i]] = emb[i]
        progress.advance(task, len(chunk))
    progress.remove_task(task)
    return vectors


def run_campaign(
    out: Path,
    seeds: list[int],
    settings: Settings,
    arms: tuple[Arm, ...] = ARMS,
    replicas: int = 1,
    model: str | None = None,
    library_size: int | None = None,
    kill_replica_after: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    from colmena.task_server import ParslTaskServer

    from apps.molecular_design.simulate import simulate
    from tpmflow.colmena import SafePipeQueues, tpm_methods
    from tpmflow.versioning.checkout import replica_model_dir

    console = console or Console()
    names = [a.name for a in arms]
    for arm in arms:
        if arm.memory_from is not None and (
            arm.memory_from not in names or names.index(arm.memory_from) > names.index(arm.name)
        ):
            raise ValueError(f"arm {arm.name} starts warm from arm {arm.memory_from}'s results: run that arm before it")
    out.mkdir(parents=True, exist_ok=True)
    # HTEX workers import apps.molecular_design.simulate by name.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    started = time.monotonic()
    library = load_library()
    if library_size is not None:
        library = [library[i] for i in np.random.default_rng(12345).permutation(len(library))[:library_size]]

    with console.status(f"starting the pool ({replicas} vLLM replica(s) of the demo model)…"):
        pool = start_pool(out, replicas, model)
    # Who runs it, from when: the workbench's Campaigns page shows its TPM calls live from this.
    started_at = {"principal": pool.access.authenticate(pool.token).name, "started": time.time(), "gateway": pool.url}
    (out / "campaign.json").write_text(json.dumps(started_at))
    model_dir = replica_model_dir(pool.cfg)
    queues = SafePipeQueues(topics=["simulate", "tpm", "tpm_tasks"], keep_inputs=False)
    server: ParslTaskServer | None = None
    rows: list[dict[str, Any]] = []
    thinkers: list[DesignThinker] = []
    handle = (out / "simulations.csv").open("w", newline="")
    writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    write_lock = threading.Lock()
    killed: list[str] = []
    try:  # from here on, whatever fails, the pool and the task server are stopped
        tpm_tasks = tpm_methods(pool.url, pool.token, calls=("embed",), executors=["tpm"])
        server = ParslTaskServer([(simulate, {"executors": ["sim"]}), *tpm_tasks], queues, task_server_config(out))
        server.start()
        with pool.client() as client, _progress(console) as progress:
            # Campaign memory: every simulated molecule and its objective, recorded as results arrive.
            settings = replace(settings, memory=f"molecular-design-{uuid.uuid4().hex[:8]}")
            client.knowledge(settings.memory).create(adapter="smiles")
            tpm_features = embed_library(client, library, progress) if any(a.features == "tpm" for a in arms) else {}
            fp_features = dict(zip(library, fingerprints(library), strict=True))
            usable = [s for s in library if s in tpm_features or not tpm_features]
            bar = progress.add_task("simulations", total=len(seeds) * len(arms) * settings.budget)

            def on_result(row: dict[str, Any]) -> None:
                with write_lock:
                    rows.append(row)
                    writer.writerow(row)
                    handle.flush()
                    if kill_replica_after is not None and len(rows) == kill_replica_after:
                        threading.Thread(target=_kill_a_busy_replica, args=(pool, killed), daemon=True).start()
                progress.advance(bar)

            for seed in seeds:
                for arm in arms:
                    progress.update(bar, description=f"seed {seed}, arm {arm.name}")
                    features = {"tpm": tpm_features, "fingerprint": fp_features, "none": {}}[arm.features]
                    thinker = DesignThinker(
                        queues, arm, seed, usable, features, settings, on_result, url=pool.url, token=pool.token
                    )
                    thinker.start()
                    thinker.join()
                    thinkers.append(thinker)
            usage = client.usage()
    finally:
        handle.close()
        if server is not None:
            queues.send_kill_signal()
            server.join(timeout=60)
            if server.is_alive():
                server.terminate()
        pool.stop()
    record = _record(
        out, model_dir, seeds, settings, arms, library, rows, thinkers, usage, killed, time.monotonic() - started
    )
    plot_best_found(rows, arms, settings.budget, out / "best_found.png")
    print_summary(console, record)
    return record


def _kill_a_busy_replica(pool: Any, killed: list[str], timeout_s: float = 120.0) -> None:
    """(testing) SIGKILL the first replica seen serving a call, so a TPM call is cut mid-flight;
    the gateway retries it on another replica and the launcher restarts this one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [r.info.replica_id for r in pool.gateway.registry.live() if r.inflight > 0]
        if busy:
            killed.append(busy[0])
            pool.launcher.kill(busy[0])
            return
        time.sleep(0.01)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


def best_so_far(rows: list[dict[str, Any]], budget: int) -> np.ndarray:
    """Best objective after 1..budget simulations (NaN until the first success)."""
    values = np.full(budget, np.nan)
    for row in rows:
        if row["index"] < budget:
            values[row["index"]] = row["objective"]
    with np.errstate(invalid="ignore"):
        return np.fmax.accumulate(np.where(np.isfinite(values), values, -np.inf))


def _record(
    out: Path,
    model_dir: Path,
    seeds: list[int],
    settings: Settings,
    arms: tuple[Arm, ...],
    library: list[str],
    rows: list[dict[str, Any]],
    thinkers: list[DesignThinker],
    usage: list[dict[str, Any]],
    killed: list[str],
    seconds: float,
) -> dict[str, Any]:
    from importlib.metadata import version

    from tpmflow.models.card import read_card

    card = read_card(model_dir)
    per_arm: dict[str, Any] = {}
    for arm in arms:
        finals = []
        for seed in seeds:
            mine = [r for r in rows if r["arm"] == arm.name and r["seed"] == seed]
            finals.append(float(best_so_far(mine, settings.budget)[-1]))
        arm_rows = [r for r in rows if r["arm"] == arm.name]
        per_arm[arm.name] = {
            "best_per_seed": finals,
            "best_mean": float(np.mean(finals)),
            "best_std": float(np.std(finals)),
            "simulations": len(arm_rows),
            "failed": sum(1 for r in arm_rows if r.get("error")),
            "proposed_simulated": sum(1 for r in arm_rows if r["source"] == "proposed"),
            "tpm_failures": sum(len(t.tpm_failures) for t in thinkers if t.arm.name == arm.name),
            "proposals": {
                key: sum(t.proposal_counts[key] for t in thinkers if t.arm.name == arm.name)
                for key in ("completions", "new_valid", "candidates")
            },
            # a warm start's retrieved results, per seed (they are not among its own simulations)
            "memory_retrieved": [len(t.memory) for t in thinkers if t.arm.name == arm.name],
            "memory_best": [
                max((m["objective"] for m in t.memory if np.isfinite(m["objective"])), default=None)
                for t in thinkers
                if t.arm.name == arm.name
            ],
        }
    record = {
        "model": {"name": card.name, "content_hash": card.content_hash, "parameters": card.parameters},
        "adapter": {"name": "smiles", "package": "tpmflow-smiles", "version": version("tpmflow-smiles")},
        "tpmflow": version("tpmflow"),
        "seeds": seeds,
        "settings": asdict(settings),
        "arms": [asdict(a) for a in arms],
        "objective": "MMFF94 dipole moment (Debye) / sqrt(heavy atoms), lowest-energy of 4 ETKDG conformers",
        "library": {
            "source": "RDKit NCI first_5K.smi (neutral, single fragment, 4-40 heavy atoms)",
            "size": len(library),
        },
        "results": per_arm,
        "memory_collection": settings.memory,
        "ledger_usage": usage,
        "replicas_killed": killed,
        "seconds": round(seconds, 1),
        "outputs": [str(out / name) for name in ("simulations.csv", "best_found.png", "run.json")],
    }
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return record


def plot_best_found(rows: list[dict[str, Any]], arms: tuple[Arm, ...], budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(1, budget + 1)
    for arm in arms:
        seeds = sorted({r["seed"] for r in rows if r["arm"] == arm.name})
        curves = np.stack(
            [best_so_far([r for r in rows if r["arm"] == arm.name and r["seed"] == s], budget) for s in seeds]
        )
        curves[~np.isfinite(curves)] = np.nan
        mean = np.nanmean(curves, axis=0)
        ax.plot(x, mean, label=f"{arm.name} (n={len(seeds)} seeds)")
        ax.fill_between(x, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0), alpha=0.15)
    ax.set_xlabel("simulations")
    ax.set_ylabel("best objective found (D / √heavy atoms)")
    ax.set_title("best found vs simulations (line: mean, band: min-max over seeds)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(console: Console, record: dict[str, Any]) -> None:
    table = Table(title=f"best objective after {record['settings']['budget']} simulations per arm")
    for col in ("arm", "mean ± std over seeds", "per seed", "failed sims", "proposals simulated", "TPM failures"):
        table.add_column(col)
    ranked = sorted(record["results"].items(), key=lambda kv: -kv[1]["best_mean"])
    for name, r in ranked:
        table.add_row(
            name,
            f"{r['best_mean']:.3f} ± {r['best_std']:.3f}",
            ", ".join(f"{v:.3f}" for v in r["best_per_seed"]),
            str(r["failed"]),
            str(r["proposed_simulated"]),
            str(r["tpm_failures"]),
        )
    console.print(table)
    for name, r in ranked:
        if r["memory_retrieved"] and any(r["memory_retrieved"]):
            bests = ", ".join("-" if b is None else f"{b:.3f}" for b in r["memory_best"])
            console.print(
                f"{name} started warm from {r['memory_retrieved']} results retrieved per seed (best among them: "
                f"{bests}); its own {record['settings']['budget']} simulations are all new molecules"
            )
    tokens = sum(int(u.get("prompt_tokens", 0)) + int(u.get("output_tokens", 0)) for u in record["ledger_usage"])
    console.print(
        f"winner over {len(record['seeds'])} seeds: [bold]{ranked[0][0]}[/]; model {record['model']['content_hash']}; "
        f"{tokens:,} tokens through the pool; {record['seconds']:.0f} s"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "molecular_design")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=Settings.budget)
    parser.add_argument("--retrain-every", type=int, default=Settings.retrain_every)
    parser.add_argument("--arms", nargs="+", choices=[a.name for a in ARMS], default=[a.name for a in ARMS])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--model", default=None, help="default: the config's model (the demo SMILES model)")
    parser.add_argument("--library-size", type=int, default=None, help="a random subset of the NCI set")
    parser.add_argument("--kill-replica-after", type=int, default=None, help="(testing) kill a replica mid-campaign")
    args = parser.parse_args(argv)
    settings = Settings(budget=args.budget, retrain_every=args.retrain_every)
    arms = tuple(a for a in ARMS if a.name in args.arms)
    return run_campaign(
        args.out,
        args.seeds,
        settings,
        arms,
        replicas=args.replicas,
        model=args.model,
        library_size=args.library_size,
        kill_replica_after=args.kill_replica_after,
    )


if __name__ == "__main__":
    main()
