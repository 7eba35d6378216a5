"""``tpmflow adapters fit protein``: train on SYNTHETIC sequences (``data.make_sequences``), serve
the part, fit a GRAVY head on the pool's embeddings and report its held-out error next to the two
baselines (``tpmflow.adapters.quality``). The command calls this with a client of the pool it
started, the folder of the model the pool serves, and the pool's parts folder already in effect."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quality_check(
    client: Any,
    core_dir: str | Path,
    version: str = "0.1.0",
    steps: int = 300,
    progress: Any = None,
    n_train: int = 400,
    n_heldout: int = 200,
) -> Any:
    """The ``tpmflow.fits`` entry point: returns a ``tpmflow.adapters.quality.QualityReport``."""
    from tpmflow.adapters.quality import fit_soft_adapter
    from tpmflow_protein.adapter import ProteinAdapter
    from tpmflow_protein.data import make_sequences

    train = make_sequences(n_train, seed=0)
    heldout = make_sequences(n_heldout, seed=1)  # another seed: new sequences
    return fit_soft_adapter(
        client,
        core_dir,
        ProteinAdapter(),
        train,
        heldout,
        task="regression",
        target="gravy",
        name="gravy-projector",
        version=version,
        steps=steps,
        training_data={"source": "synthetic sequences (tpmflow_protein.data), train seed 0, held-out seed 1"},
        progress=progress,
    )
