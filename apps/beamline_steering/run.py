"""Command line and campaign loop of the beamline steering app (see the package docstring).

Flow: make the SYNTHETIC sample grid; take the low-dose survey (one frame per position); start a
tpmflow pool and embed every survey frame once through the ``beamline`` adapter; stop the pool;
then, per repeat, run each arm for ``--budget`` full-exposure measurements and keep the highest
integrated Bragg intensity found so far. Within a repeat, a position's full frame has the same
detector noise whichever arm measures it (common random numbers), so arms differ only by where
they look.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from apps.beamline_steering import quality
from apps.beamline_steering.agents import PositionAgent, raster_order
from apps.beamline_steering.sample import SURVEY_EXPOSURE, SampleGrid, make_grid
from apps.steering import evaluation, outputs, pool_session
from apps.steering.agents import FixedOrderAgent, SurrogateAgent
from apps.steering.surrogate import whiten

APP = "beamline_steering"
ARMS = ("tpm-survey-gp", "classical-survey-gp", "position-gp", "raster", "random")
PART_NAME = "peaks"  # the projector `tpmflow adapters fit beamline` trains
FIT_OPTIONS = {"n_train": 120, "n_heldout": 60, "steps": 100}  # a smaller fit than the CLI's, for time
PCA_COMPONENTS = 8
SURVEY_STREAM = 1_000_003  # seeds the survey's noise apart from the measurements'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m apps.{APP}", description=__doc__)
    parser.add_argument("--budget", type=int, default=40, help="full-exposure measurements per arm and repeat")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample, the noise and the random orders")
    parser.add_argument("--repeats", type=int, default=5, help="independent repeats of every arm")
    parser.add_argument("--nx", type=int, default=20, help="grid positions along x")
    parser.add_argument("--ny", type=int, default=20, help="grid positions along y")
    parser.add_argument("--warmup", type=int, default=5, help="random positions before the GP arms steer")
    parser.add_argument("--out", type=Path, default=Path("runs") / APP, help="output folder")
    parser.add_argument("--config", type=Path, default=pool_session.DEFAULT_CONFIG, help="tpmflow pool config")
    args = parser.parse_args(argv)
    if args.nx < 2 or args.ny < 2:
        parser.error("--nx and --ny must be at least 2")
    if not 1 <= args.budget <= args.nx * args.ny:
        parser.error(f"--budget must be between 1 and the number of positions ({args.nx * args.ny})")
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be at least 1")
    return args


def measure(grid: SampleGrid, index: int, seed: int, repeat: int) -> quality.Reading:
    """One full-exposure frame at ``index`` and its reading; the noise depends only on
    (seed, repeat, position), so every arm of a repeat sees the same frame there."""
    return quality.integrate(grid.render(index, 1.0, np.random.default_rng([seed, repeat, index])))


def standardised(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float64)
    return (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-12)


def arm_features(grid: SampleGrid, embeddings: np.ndarray, survey: np.ndarray) -> dict[str, np.ndarray]:
    """What each GP arm's surrogate sees per position: TPM embeddings of the survey frame, or the
    classical reading of it, or nothing but the position; always with the standardised position."""
    where = standardised(grid.positions)
    return {
        "tpm-survey-gp": np.hstack([whiten(embeddings, PCA_COMPONENTS), where]),
        "classical-survey-gp": np.hstack([standardised(np.log1p(survey)), where]),
        "position-gp": where,
    }


def make_agents(args: argparse.Namespace, grid: SampleGrid, features: dict[str, np.ndarray], repeat: int) -> dict:
    """Every arm's agent for one repeat; the GP arms share the random arm's first picks."""
    order = np.random.default_rng([args.seed, repeat]).permutation(len(grid.positions))
    agents = {arm: SurrogateAgent(x, order[: args.warmup], maximize=True) for arm, x in features.items()}
    agents["raster"] = FixedOrderAgent(raster_order(args.nx, args.ny, args.budget), name="raster")
    agents["random"] = FixedOrderAgent(order)
    return {arm: PositionAgent(grid.positions, agents[arm]) for arm in ARMS}


def run_arm(agent: PositionAgent, arm: str, repeat: int, grid: SampleGrid, args: argparse.Namespace, tick: Any):
    """``budget`` suggest → measure → ingest rounds; one CSV row per measurement."""
    rows: list[dict[str, Any]] = []
    best = -np.inf
    for step in range(1, args.budget + 1):
        x, y = agent.suggest(1)[0]
        index = agent.index_of((x, y))
        t0 = time.perf_counter()
        reading = measure(grid, index, args.seed, repeat)
        seconds = time.perf_counter() - t0
        agent.ingest((x, y), reading.intensity)
        best = max(best, reading.intensity)
        rows.append(
            {
                "arm": arm,
                "repeat": repeat,
                "step": step,
                "x_mm": round(x, 4),
                "y_mm": round(y, 4),
                "position": index,
                "intensity": round(reading.intensity, 2),
                "spots": reading.spots,
                "best_so_far": round(best, 2),
                "hidden_crystallinity": round(float(grid.crystallinity[index]), 5),  # evaluation only
                "measure_s": round(seconds, 5),
            }
        )
        tick()
    return rows


def campaign(args: argparse.Namespace, grid: SampleGrid, features: dict[str, np.ndarray], console: Console):
    rows: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("measurements", total=args.repeats * len(ARMS) * args.budget)
        for repeat in range(args.repeats):
            for arm, agent in make_agents(args, grid, features, repeat).items():
                progress.update(task, description=f"repeat {repeat + 1}/{args.repeats}, {arm}")
                rows += run_arm(agent, arm, repeat, grid, args, lambda: progress.advance(task))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    console = Console()
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    grid = make_grid(args.nx, args.ny, args.seed)
    n = len(grid.positions)
    console.print(f"[bold]{APP}[/]: SYNTHETIC {args.nx}x{args.ny} sample grid, seed {args.seed}")
    rng = np.random.default_rng([args.seed, SURVEY_STREAM])
    with console.status(f"low-dose survey ({SURVEY_EXPOSURE:.0%} exposure) at {n} positions…"):
        frames = [grid.render(i, SURVEY_EXPOSURE, rng) for i in range(n)]
        survey = np.array([quality.integrate(f).intensity for f in frames])
    from tpmflow_beamline.fit import quality_check

    embedded = pool_session.embed_through_pool(
        args.config, "beamline", PART_NAME, quality_check, FIT_OPTIONS, frames, console
    )
    record: dict[str, Any] = {"pool": embedded.info, "timings": embedded.timings}
    t0 = time.monotonic()
    rows = campaign(args, grid, arm_features(grid, embedded.vectors, survey), console)
    record["timings"]["campaign_s"] = time.monotonic() - t0

    # Evaluation only: every position measured once (repeat 0's noise), after the campaign.
    full = np.array([measure(grid, i, args.seed, 0).intensity for i in range(n)])
    curves = outputs.curves_of(rows, ARMS, args.repeats, args.budget)
    summary = outputs.arm_summary(curves)
    verdict = outputs.winner(summary, maximize=True)
    outputs.write_csv(args.out / "measurements.csv", rows)
    outputs.plot_best_found(
        args.out / "best_found.png",
        curves,
        "highest integrated Bragg intensity found (counts)",
        f"Beamline steering (synthetic {args.nx}x{args.ny} grid, {args.repeats} repeats)",
        reference=float(full.max()),
        reference_label="best position, repeat 0 noise (evaluation only)",
        xlabel="number of full-exposure measurements",
    )
    record["timings"]["total_s"] = time.monotonic() - started
    record.update(
        {
            "app": APP,
            "synthetic": True,
            "data": "diffraction frames from a forward model (smoothly varying Bragg intensity) + Poisson noise",
            "objective": "maximise the integrated Bragg intensity of a full-exposure frame (classical spot finder)",
            "survey": {"exposure": SURVEY_EXPOSURE, "frames": n, "dose_in_full_frames": SURVEY_EXPOSURE * n},
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "arms": summary,
            "winner": verdict,
            "evaluation": {
                "best_position_intensity": float(full.max()),
                "tpm_survey_embeddings_to_intensity_cv_r2": evaluation.cross_validated_r2(
                    whiten(embedded.vectors, PCA_COMPONENTS), full
                ),
                "classical_survey_reading_to_intensity_cv_r2": evaluation.cross_validated_r2(
                    np.log1p(survey)[:, None], full
                ),
            },
            "outputs": {"csv": "measurements.csv", "plot": "best_found.png"},
        }
    )
    outputs.write_json(args.out / "record.json", record)
    outputs.print_summary(
        console, f"{APP}: highest integrated Bragg intensity found, counts (higher is better)", summary, verdict, ",.0f"
    )
    ev = record["evaluation"]
    console.print(
        f"best position {ev['best_position_intensity']:.0f} counts; survey → full intensity CV R²: "
        f"TPM embeddings {ev['tpm_survey_embeddings_to_intensity_cv_r2']:.3f}, classical "
        f"{ev['classical_survey_reading_to_intensity_cv_r2']:.3f}; survey dose = "
        f"{SURVEY_EXPOSURE * n:.0f} full frames; total {record['timings']['total_s']:.0f} s; outputs in {args.out}"
    )
