"""What a campaign run leaves behind: a CSV row per simulation, a best-found plot, a JSON record and
a printed summary. Shared by both steering apps so their outputs read the same way."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table


def best_so_far(values: np.ndarray, maximize: bool) -> np.ndarray:
    """Running best along the last axis."""
    return np.maximum.accumulate(values, axis=-1) if maximize else np.minimum.accumulate(values, axis=-1)


def curves_of(rows: list[dict[str, Any]], arms: Sequence[str], repeats: int, budget: int) -> dict[str, np.ndarray]:
    """``[repeats, budget]`` running bests per arm, from the CSV rows."""
    curves = {arm: np.zeros((repeats, budget)) for arm in arms}
    for row in rows:
        curves[row["arm"]][row["repeat"], row["step"] - 1] = row["best_so_far"]
    return curves


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def plot_best_found(
    path: Path,
    curves: dict[str, np.ndarray],
    ylabel: str,
    title: str,
    reference: float | None = None,
    reference_label: str = "",
    xlabel: str = "number of simulations",
) -> None:
    """Mean best-found per arm against simulations, with the spread over repeats shaded.

    ``curves[arm]`` is ``[repeats, budget]`` of running bests."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a compute node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, runs in curves.items():
        steps = np.arange(1, runs.shape[1] + 1)
        (line,) = ax.plot(steps, runs.mean(axis=0), label=f"{arm} (mean of {runs.shape[0]})", lw=2)
        if runs.shape[0] > 1:
            ax.fill_between(steps, runs.min(axis=0), runs.max(axis=0), color=line.get_color(), alpha=0.15)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label=reference_label)
    ax.set_xlabel(xlabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arm_summary(curves: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per arm: final best per repeat and its mean, and the mean running best over the whole budget
    (the area under the curve: rewards finding good samples early)."""
    return {
        arm: {
            "final_best_per_repeat": runs[:, -1].tolist(),
            "final_best_mean": float(runs[:, -1].mean()),
            "mean_running_best": float(runs.mean()),
        }
        for arm, runs in curves.items()
    }


def winner(summary: dict[str, dict[str, Any]], maximize: bool) -> dict[str, Any]:
    """The arm with the best mean final value (ties named as such) and the best area under the curve."""
    pick = max if maximize else min
    finals = {arm: s["final_best_mean"] for arm, s in summary.items()}
    areas = {arm: s["mean_running_best"] for arm, s in summary.items()}
    top = pick(finals.values())
    tied = sorted(arm for arm, v in finals.items() if abs(v - top) <= 1e-12)
    return {
        "by_final_best": tied[0] if len(tied) == 1 else "tie: " + ", ".join(tied),
        "by_mean_running_best": pick(areas, key=lambda arm: areas[arm]),
    }


def print_summary(
    console: Console, title: str, summary: dict[str, dict[str, Any]], verdict: dict[str, Any], fmt: str
) -> None:
    """One row per arm (the per-repeat values are in the JSON record); ``fmt`` formats the
    objective's values (e.g. ``".3f"``, ``",.0f"``)."""
    table = Table(title=title)
    for column in ("arm", "final best: mean ± sd", "mean running best"):
        table.add_column(column, justify="left" if column == "arm" else "right", no_wrap=True)
    for arm, s in summary.items():
        finals = np.array(s["final_best_per_repeat"])
        spread = f"{format(s['final_best_mean'], fmt)} ± {format(float(finals.std()), fmt)}"
        table.add_row(arm, spread, format(s["mean_running_best"], fmt))
    console.print(table)
    console.print(
        f"winner by final best: [bold]{verdict['by_final_best']}[/]; "
        f"by mean running best: [bold]{verdict['by_mean_running_best']}[/]"
    )
