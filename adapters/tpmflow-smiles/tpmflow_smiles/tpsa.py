"""A TPSA head for the SMILES adapter, and the honest check of whether the core model helps.

Labels: RDKit's shipped ``first_5k.tpsa.csv``. Training molecules: the demo model's own training
split; test: its held-out split (never molecules the core model was trained on). Reported side by
side on the held-out set: the head on core embeddings, the same ridge head on the adapter's encoder
features alone (Morgan fingerprints, no core model), and on a random projection of those features
to the core's hidden size (a random projector). The point is to learn whether the core helps.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tpmflow.adapters.heads import RidgeHead, r2, save_head
from tpmflow.adapters.parts import PartCard


def tpsa_labels() -> dict[str, float]:
    """Canonical SMILES -> TPSA from ``rdkit/Data/NCI/first_5k.tpsa.csv``."""
    from rdkit import RDConfig

    from tpmflow.models.smiles_data import canonical

    labels: dict[str, float] = {}
    for line in (Path(RDConfig.RDDataDir) / "NCI" / "first_5k.tpsa.csv").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        smiles, _, value = line.rpartition(",")
        can = canonical(smiles)
        if can is not None:
            labels.setdefault(can, float(value))
    return labels


def _embed_all(client: Any, smiles: Sequence[str], batch: int, desc: str) -> tuple[np.ndarray, dict[str, Any]]:
    from tqdm import tqdm

    rows: list[np.ndarray] = []
    provenance: dict[str, Any] = {}
    for start in tqdm(range(0, len(smiles), batch), desc=desc, unit="batch"):
        emb = client.embed(list(smiles[start : start + batch]), adapter="smiles")
        rows.append(emb.numpy())  # every item here parsed already, so an error is a real failure
        provenance = emb.provenance
    return np.concatenate(rows), provenance


def fit_tpsa_head(
    client: Any,
    train: Sequence[str],
    heldout: Sequence[str],
    version: str = "0.1.0",
    owner: str = "facility",
    batch: int = 64,
    seed: int = 0,
) -> tuple[Path, PartCard]:
    """Fit on ``train`` molecules, score on ``heldout``, save the head and its card."""
    from tpmflow_smiles import SmilesAdapter

    labels = tpsa_labels()
    train = [s for s in train if s in labels]
    heldout = [s for s in heldout if s in labels]
    y_train = np.array([labels[s] for s in train], dtype=np.float64)
    y_held = np.array([labels[s] for s in heldout], dtype=np.float64)
    x_train, provenance = _embed_all(client, train, batch, "embedding training molecules")
    x_held, _ = _embed_all(client, heldout, batch, "embedding held-out molecules")
    head, alpha = RidgeHead.fit_with_validation(x_train, y_train, seed)

    adapter = SmilesAdapter()
    fp_train, _ = adapter.fingerprints(train)
    fp_held, _ = adapter.fingerprints(heldout)
    fp_head, fp_alpha = RidgeHead.fit_with_validation(fp_train, y_train, seed)
    projector = np.random.default_rng(seed).normal(
        0, 1 / np.sqrt(fp_train.shape[1]), (fp_train.shape[1], x_train.shape[1])
    )
    rp_head, rp_alpha = RidgeHead.fit_with_validation(fp_train @ projector, y_train, seed)

    metrics = {
        "heldout_r2_core_embeddings": r2(y_held, head.predict(x_held)),
        "heldout_r2_fingerprints_alone": r2(y_held, fp_head.predict(fp_held)),
        "heldout_r2_random_projector": r2(y_held, rp_head.predict(fp_held @ projector)),
        "heldout_mae_core_embeddings": float(np.abs(y_held - head.predict(x_held)).mean()),
        "alpha": {"core": alpha, "fingerprints": fp_alpha, "random_projector": rp_alpha},
        "n_train": len(train),
        "n_heldout": len(heldout),
    }
    card = PartCard(
        kind="ridge-regression",
        adapter="smiles",
        name="tpsa",
        version=version,
        owner=owner,
        modality="molecule",
        base_model=str(provenance.get("model", "")),
        base_content_hash=str(provenance.get("content_hash", "")),
        hidden_size=int(x_train.shape[1]),
        target="TPSA (Å², Ertl) from rdkit/Data/NCI/first_5k.tpsa.csv",
        training_data={
            "source": "rdkit/Data/NCI/first_5k.tpsa.csv",
            "train": "the demo model's training split",
            "heldout": "the demo model's held-out split (never seen by the core model)",
            "pooling": "mean of final hidden states",
        },
        metrics=metrics,
    )
    return save_head(head, card), card
