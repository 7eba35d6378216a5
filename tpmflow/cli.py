"""The ``tpmflow`` command."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tpmflow import __version__

app = typer.Typer(help="tpmflow: a co-located vLLM model pool for Parsl / Colmena science campaigns.",
                  no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Build and list the locally built models.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()


@app.command()
def version() -> None:
    """Print tpmflow's version."""
    console.print(f"tpmflow {__version__}")


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Report what is installed and usable here; exit 1 when something required is missing."""
    from tpmflow.doctor import run_checks, verdict

    checks = run_checks()
    ready, line = verdict(checks)
    if as_json:
        print(json.dumps({"ready": ready, "verdict": line, "checks": [c.__dict__ for c in checks]}))
    else:
        table = Table(title="tpmflow doctor", show_lines=False)
        for col in ("", "component", "status", "fix"):
            table.add_column(col)
        for c in checks:
            mark = "[green]ok[/]" if c.ok else ("[red]MISSING[/]" if c.required else "[yellow]absent[/]")
            table.add_row(mark, c.name, c.detail, c.fix if not c.ok else "")
        console.print(table)
        console.print(f"[bold {'green' if ready else 'red'}]{line}[/]")
    raise typer.Exit(0 if ready else 1)


@models_app.command("build-tiny")
def build_tiny(
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build the random-weight tiny Llama used by tests (seconds)."""
    from tpmflow.models.catalog import TINY_MODEL
    from tpmflow.models.tiny import build_tiny as build

    _build_or_skip(TINY_MODEL, force, lambda: build(seed=seed, force=force))


@models_app.command("build-demo")
def build_demo(
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
    seed: Annotated[int, typer.Option(help="Training seed (the held-out split is fixed).")] = 0,
    steps: Annotated[int, typer.Option(help="Optimiser steps (~4 minutes on 2 cores at the default).")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Molecules per step.")] = 64,
    samples: Annotated[int, typer.Option(help="Samples drawn through vLLM to score the model (0 skips).")] = 200,
    name: Annotated[str, typer.Option(help="Folder name in the model cache.")] = "smiles-llama",
) -> None:
    """Train the demo SMILES language model on RDKit's NCI set and score its samples through vLLM."""
    from tpmflow.models.demo import FLOORS, TrainSettings
    from tpmflow.models.demo import build_demo as build

    def run() -> None:
        path, card = build(name=name, settings=TrainSettings(steps=steps, batch_size=batch_size, seed=seed),
                           samples=samples, force=force)
        m = card.metrics or {}
        table = Table(title=f"{name}: {card.parameters:,} parameters, {card.content_hash[:19]}…")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("floor", justify="right")
        table.add_row("held-out loss (nats/token)", f"{m['heldout_loss']:.3f}", f"< {m['unigram_heldout_loss']:.3f}")
        table.add_row("unigram baseline loss", f"{m['unigram_heldout_loss']:.3f}", "")
        for key, floor in FLOORS.items():
            if key in m:
                ok = m[key] >= floor
                table.add_row(f"{key} ({m['n']} samples, T=1.0)", f"[{'green' if ok else 'red'}]{m[key]:.3f}[/]",
                              f">= {floor}")
        console.print(table)
        if "examples" in m:
            console.print("samples: " + "  ".join(m["examples"][:5]))
        console.print(f"saved to {path}")

    _build_or_skip(name, force, run)


def _build_or_skip(name: str, force: bool, build: object) -> None:
    from tpmflow.config import models_dir

    if (models_dir() / name / "tpmflow-card.json").is_file() and not force:
        console.print(f"{name} already built in {models_dir() / name} (use --force to rebuild)")
        return
    build()  # type: ignore[operator]


@models_app.command("list")
def list_models() -> None:
    """List the models in the cache with their identity and quality."""
    from tpmflow.config import models_dir
    from tpmflow.models.catalog import list_models as find

    found = find()
    if not found:
        console.print(f"no models in {models_dir()}; run `tpmflow models build-tiny` or `build-demo`")
        return
    table = Table(title=f"models in {models_dir()}")
    for col in ("name", "kind", "parameters", "content hash", "quality"):
        table.add_column(col)
    for path, card in found:
        if card is None:
            table.add_row(path.name, "[red]no valid card[/]", "", "", "")
            continue
        m = card.metrics or {}
        quality = ", ".join(f"{k} {m[k]:.2f}" for k in ("heldout_loss", "validity", "uniqueness", "novelty") if k in m)
        table.add_row(card.name, card.kind, f"{card.parameters:,}", card.content_hash[:23] + "…", quality or "-")
    console.print(table)


if __name__ == "__main__":
    app()
