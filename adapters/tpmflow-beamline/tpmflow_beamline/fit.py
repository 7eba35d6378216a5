"""``tpmflow adapters fit beamline``: train the patch encoder + projector on SYNTHETIC detector
frames with known Bragg peaks (``synthetic.make_dataset``), sent to the pool as NeXus files, and
report the held-out peak-count error of the head next to its baselines (``tpmflow.adapters.quality``)
and the classical peak finder (``peaks.count_peaks``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def quality_check(
    client: Any,
    core_dir: str | Path,
    version: str = "0.1.0",
    n_train: int = 400,
    n_heldout: int = 200,
    steps: int = 300,
    progress: Any = None,
) -> Any:
    from tpmflow.adapters.quality import fit_soft_adapter
    from tpmflow_beamline.adapter import BeamlineAdapter
    from tpmflow_beamline.peaks import count_peaks
    from tpmflow_beamline.synthetic import make_dataset, nexus_bytes

    adapter = BeamlineAdapter()
    train_frames, y_train = make_dataset(n_train, seed=0)
    held_frames, y_held = make_dataset(n_heldout, seed=1)
    # Every item travels as a NeXus file, through the pool's store and the sandboxed reader.
    train_items = [nexus_bytes([f]) for f in train_frames]
    held_items = [nexus_bytes([f]) for f in held_frames]
    report = fit_soft_adapter(
        client,
        core_dir,
        adapter,
        (train_items, y_train.astype(np.float64)),
        (held_items, y_held.astype(np.float64)),
        task="regression",
        target="bragg_peaks",
        name="peaks",
        version=version,
        steps=steps,
        training_data={"source": "synthetic NeXus frames (tpmflow_beamline.synthetic), train seed 0, held-out seed 1"},
        progress=progress,
    )
    classical = np.array([count_peaks(f) for f in held_frames])
    report.extra["classical_peak_finder_mae"] = float(np.abs(classical - y_held).mean())
    return report
