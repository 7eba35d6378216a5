"""``tpmflow adapters fit pointcloud``: train the encoder + projector on the SYNTHETIC shape task
(``synthetic.make_shapes``) through a frozen copy of the core, serve it, and report held-out
accuracy of the classification head next to its baselines (see ``tpmflow.adapters.quality``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quality_check(
    client: Any,
    core_dir: str | Path,
    version: str = "0.1.0",
    n_train: int = 600,
    n_heldout: int = 300,
    steps: int = 300,
    progress: Any = None,
) -> Any:
    from tpmflow.adapters.quality import fit_soft_adapter
    from tpmflow_pointcloud.adapter import PointCloudAdapter, PointCloudSettings
    from tpmflow_pointcloud.synthetic import make_shapes

    # 1024 points, 16 patches of 32: each patch covers a real piece of the shape (Point-BERT's sizes).
    adapter = PointCloudAdapter(PointCloudSettings(max_points=1024))
    train_items, y_train, classes = make_shapes(n_train, seed=0)
    held_items, y_held, _ = make_shapes(n_heldout, seed=1)  # another seed: new shapes, poses, noise
    return fit_soft_adapter(
        client,
        core_dir,
        adapter,
        (train_items, y_train),
        (held_items, y_held),
        task="classification",
        target="shape",
        classes=classes,
        name="shapes",
        version=version,
        steps=steps,
        training_data={"source": "synthetic shapes (tpmflow_pointcloud.synthetic), train seed 0, held-out seed 1"},
        progress=progress,
    )
