"""The two steering apps (``apps.pointcloud_screening``, ``apps.beamline_steering``): their science
parts on their own, then each app end to end as a subprocess with a tiny budget, on a real pool of
the demo model. The first end-to-end run on a machine fits the adapter's part if none exists for
the demo model (saved in the shared parts folder, reused afterwards), so it takes longer once."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apps.beamline_steering.agents import PositionAgent, raster_order
from apps.beamline_steering.quality import integrate
from apps.beamline_steering.sample import make_grid
from apps.pointcloud_screening.analysis import analyse
from apps.pointcloud_screening.samples import make_lattice
from apps.steering.agents import FixedOrderAgent, SurrogateAgent

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "pointcloud_screening": ["--budget", "6", "--repeats", "2", "--samples", "40", "--warmup", "3"],
    "beamline_steering": ["--budget", "6", "--repeats", "2", "--nx", "8", "--ny", "8", "--warmup", "3"],
}


def test_coordination_analysis_sees_the_hidden_defects() -> None:
    rng = np.random.default_rng(0)
    perfect = analyse(make_lattice(rng, 0.0, 7, 1.0, 0.02))
    defective = analyse(make_lattice(rng, 0.2, 7, 1.0, 0.02))
    assert perfect.defect_fraction < 0.02 and abs(perfect.lattice_constant - 1.0) < 0.05
    assert defective.defect_fraction > 0.3


def test_surrogate_agent_steers_to_the_best_candidate_on_an_informative_feature() -> None:
    feature = np.linspace(-2, 2, 50)[:, None]
    value = -((feature[:, 0] - 1.3) ** 2)  # best near feature 1.3 (index 40)
    agent = SurrogateAgent(feature, warmup=np.array([0, 25, 49]), maximize=True)
    for _ in range(10):
        i = agent.suggest(1)[0]
        agent.ingest(i, float(value[i]))
    assert int(np.argmax(value)) in agent.seen
    assert agent.report()["n_observed"] == 10


def test_position_agent_speaks_motor_positions_and_raster_covers_the_grid_once() -> None:
    order = raster_order(5, 4, 8)
    assert sorted(order) == list(range(20)) and order[:4] == [6, 8, 18, 16]  # 2x2 coarse pass first
    positions = np.array([[x * 0.1, y * 0.1] for y in range(4) for x in range(5)])
    agent = PositionAgent(positions, FixedOrderAgent(order, name="raster"))
    (x, y) = agent.suggest(1)[0]
    assert (x, y) == pytest.approx((0.1, 0.1))
    agent.ingest((x, y), 1.0)
    assert agent.suggest(1)[0] == pytest.approx((0.3, 0.1))
    assert agent.report() == {"agent": "raster", "n_observed": 1}


def test_forward_model_diffracts_more_where_crystallinity_is_higher() -> None:
    grid = make_grid(6, 6, seed=1)
    rng = np.random.default_rng(0)
    best, worst = int(np.argmax(grid.crystallinity)), int(np.argmin(grid.crystallinity))
    assert integrate(grid.render(best, 1.0, rng)).intensity > 5 * integrate(grid.render(worst, 1.0, rng)).intensity


@pytest.mark.parametrize("app", list(RUNS))
def test_app_runs_end_to_end_and_writes_sane_outputs(app: str, demo_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / app
    cmd = [sys.executable, "-m", f"apps.{app}", "--out", str(out), "--seed", "3", *RUNS[app]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    budget, repeats = int(RUNS[app][1]), int(RUNS[app][3])

    record = json.loads((out / "record.json").read_text())
    assert record["synthetic"] is True and record["app"] == app
    assert re.fullmatch(r"[\w-]+@[\w.-]+", record["pool"]["part"])
    assert record["pool"]["model"]["content_hash"].startswith("blake3:")
    rows = list(csv.DictReader((out / record["outputs"]["csv"]).open()))
    assert {r["arm"] for r in rows} == set(record["arms"]) and len(record["arms"]) >= 2
    for arm, summary in record["arms"].items():
        mine = [r for r in rows if r["arm"] == arm]
        assert len(mine) == budget * repeats
        for repeat in range(repeats):
            run = [r for r in mine if int(r["repeat"]) == repeat]
            assert [int(r["step"]) for r in run] == list(range(1, budget + 1))
            best = np.array([float(r["best_so_far"]) for r in run])
            assert np.all(np.diff(best) >= 0) if app == "beamline_steering" else np.all(np.diff(best) <= 0)
            assert best[-1] == pytest.approx(summary["final_best_per_repeat"][repeat])
    assert (out / "best_found.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "winner" in proc.stdout and record["winner"]["by_final_best"]
