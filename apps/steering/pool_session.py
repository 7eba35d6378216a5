"""A private tpmflow pool for one campaign run, and the trained adapter part it needs.

The pool is the real thing (``Pool`` on ``configs/local.yaml``: gateway + a vLLM replica), on a free
port, with its ledger and payload store in a temporary folder so runs do not share state.

Soft-token adapters need a trained encoder + projector (a "part") for the served model. A part that
``tpmflow adapters fit <adapter>`` (or an earlier run) made for the same weights is reused; if there
is none, the adapter's own ``quality_check`` fits one now on its synthetic task (with a smaller
training set, to fit the time budget), which also scores it held-out against its two baselines.
Parts live in the shared parts folder (``$TPMFLOW_PARTS`` or ``$TPMFLOW_HOME/parts``), where the
replicas look, so a fit is paid once per model.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "local.yaml"


@dataclass
class PartChoice:
    """Which projector part embeds the items, and where it came from."""

    spec: str  # name@version
    fitted_now: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)  # the part's card, or this run's fit report


def make_pool(config: Path, workdir: Path) -> Any:
    """An unstarted ``Pool`` of ``config`` on a free port, ledger and store under ``workdir``."""
    from tpmflow.config import PoolConfig
    from tpmflow.pool import Pool

    # Replica children must find the venv's `vllm` (as `make` and tests/conftest.py arrange).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cfg = PoolConfig.from_yaml(config)
    cfg.gateway.port = 0
    cfg.store = cfg.store.model_copy(update={"path": str(workdir / "store")})
    cfg.database_url = f"sqlite:///{workdir / 'access.db'}"
    return Pool(cfg)


def served_model(client: Any) -> dict[str, str]:
    """Name and content hash of the weights the pool serves (from a response's provenance)."""
    provenance = client.embed(["C"]).provenance
    return {"model": str(provenance["model"]), "content_hash": str(provenance["content_hash"])}


def find_part(adapter: str, name: str, content_hash: str) -> str | None:
    """Newest projector ``name@version`` of ``adapter`` trained for these weights, if any."""
    from tpmflow.adapters.parts import list_parts, part_path

    specs = [
        f"{c.name}@{c.version}"
        for c in list_parts()
        if c.adapter == adapter and c.kind == "projector" and c.name == name and c.base_content_hash == content_hash
    ]
    return max(specs, key=lambda s: part_path(adapter, s).stat().st_mtime, default=None)


def ensure_part(
    client: Any,
    adapter: str,
    name: str,
    model: dict[str, str],
    core_dir: Path,
    fit: Callable[..., Any],
    fit_options: dict[str, Any],
    console: Console,
) -> PartChoice:
    """Reuse the adapter's projector for these weights, or fit one now (see the module docstring)."""
    from tpmflow.adapters.parts import load_part

    started = time.monotonic()
    spec = find_part(adapter, name, model["content_hash"])
    if spec is not None:
        card = load_part(adapter, spec, kind="projector")[1]
        console.print(f"using the trained {adapter} part [bold]{spec}[/] for {model['model']}")
        return PartChoice(spec, False, time.monotonic() - started, {"card_metrics": card.metrics})
    digest = model["content_hash"].split(":")[-1][:12]
    steps = int(fit_options["steps"])
    console.print(f"no trained {adapter} part for {model['model']}: fitting one now ({fit_options})")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"training the {adapter} encoder + projector", total=steps)
        report = fit(
            client,
            core_dir,
            version=f"app-{digest}",
            progress=lambda step, loss: progress.update(task, completed=step + 1),
            **fit_options,
        )
    metrics = {k: v for k, v in asdict(report).items() if k not in ("projector",)}
    console.print(
        f"fitted {report.projector}: held-out {report.metric} {report.core:.3f} "
        f"(encoder alone {report.encoder_alone:.3f}, random projector {report.random_projector:.3f})"
    )
    return PartChoice(report.projector, True, time.monotonic() - started, {"fit_report": metrics, **fit_options})


@dataclass
class PoolEmbeddings:
    """Embeddings of a campaign's items and how they were made (for the run's record)."""

    vectors: np.ndarray  # [n, hidden]
    info: dict[str, Any]
    timings: dict[str, float]


def embed_through_pool(
    config: Path,
    adapter: str,
    part_name: str,
    fit: Callable[..., Any],
    fit_options: dict[str, Any],
    items: list[Any],
    console: Console,
    batch: int = 50,
) -> PoolEmbeddings:
    """Start a private pool, make sure ``adapter`` has a trained part, embed ``items`` (mean-pooled
    final states of the core), stop the pool. The pool is stopped before the campaign so its
    engine does not compete with the simulations for the cores."""
    from tpmflow.versioning.checkout import replica_model_dir

    timings: dict[str, float] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tpmflow-app-") as tmp:
        pool = make_pool(config, Path(tmp))
        try:
            with console.status("starting the tpmflow pool (gateway + vLLM replica)…"):
                pool.start()
            timings["pool_start_s"] = time.monotonic() - started
            with pool.client() as client:
                model = served_model(client)
                part = ensure_part(client, adapter, part_name, model, replica_model_dir(pool.cfg), fit, fit_options, console)
                timings["part_s"] = part.seconds
                t0 = time.monotonic()
                rows = []
                with console.status(f"embedding {len(items)} items through the pool's {adapter} adapter…"):
                    for start in range(0, len(items), batch):
                        out = client.embed(
                            items[start : start + batch], adapter=adapter, adapter_config={"part": part.spec}
                        )
                        rows.append(out.numpy())  # our own items: an item error is a bug, so let it raise
                timings["embed_s"] = time.monotonic() - t0
        finally:
            pool.stop()
    info = {"model": model, "adapter": adapter, "part": part.spec, "part_fitted_by_this_run": part.fitted_now}
    return PoolEmbeddings(np.concatenate(rows), {**info, "part_metrics": part.metrics}, timings)
