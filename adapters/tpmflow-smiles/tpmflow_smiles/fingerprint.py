"""``SmilesFingerprintAdapter``: the soft-token route for molecules — a Morgan fingerprint, an MLP
encoder to K vectors, a projector to the core's hidden size, sent as ``prompt_embeds``.

Trained with ``tpmflow adapters fit smiles-fp`` (a TPSA head on the demo model's own split, through
a frozen transformers copy of the core); served by name@version like any part. Generated text is
decoded exactly as the text route decodes it (valid, unique, canonical molecules).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from tpmflow.adapters import Decoded, ItemError
from tpmflow.adapters.soft import SoftTokenAdapter
from tpmflow_smiles.adapter import SmilesAdapter, SmilesSettings

TOKENS, WIDTH = 4, 128


@dataclass(frozen=True)
class FingerprintSettings:
    part: str | None = None  # trained encoder + projector, "name@version"
    prefix: str = ""  # text embedded before the soft tokens
    suffix: str = ""  # and after them
    fingerprint_radius: int = 2
    fingerprint_bits: int = 2048


class _FingerprintEncoder(nn.Module):
    """[B, 1, bits] fingerprints to [B, TOKENS, WIDTH]: one MLP, its output cut into tokens."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(bits, 512), nn.GELU(), nn.Linear(512, TOKENS * WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, 0]).view(x.shape[0], TOKENS, WIDTH)


class SmilesFingerprintAdapter(SoftTokenAdapter):
    """Molecules (SMILES or InChI) as K=4 soft tokens from their Morgan fingerprint."""

    name: ClassVar[str] = "smiles-fp"
    version: ClassVar[str] = "0.1.0"
    modality: ClassVar[str] = "molecule"
    settings_type: ClassVar[type] = FingerprintSettings
    encoder_dim: ClassVar[int] = WIDTH

    def __init__(self, settings: FingerprintSettings | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        self._smiles = SmilesAdapter(
            SmilesSettings(fingerprint_radius=s.fingerprint_radius, fingerprint_bits=s.fingerprint_bits)
        )

    def build_encoder(self) -> nn.Module:
        return _FingerprintEncoder(self.settings.fingerprint_bits)

    def prepare(self, items: Sequence[Any]) -> list[np.ndarray | ItemError]:
        fps, errors = self._smiles.fingerprints(items)
        bad = {e.item: e for e in errors}
        return [bad[i] if i in bad else fps[i][None, :] for i in range(len(items))]

    def decode(self, texts: Sequence[str]) -> list[Decoded]:
        return self._smiles.decode(texts)


def quality_check(
    client: Any,
    core_dir: str | Path,
    version: str = "0.1.0",
    steps: int = 300,
    progress: Any = None,
) -> Any:
    """TPSA on the demo model's own split (train on its training molecules, score on held-out)."""
    from tpmflow.adapters.quality import fit_soft_adapter
    from tpmflow.models.smiles_data import load_split
    from tpmflow_smiles.tpsa import tpsa_labels

    labels, split = tpsa_labels(), load_split()
    train = [s for s in split.train if s in labels]
    held = [s for s in split.heldout if s in labels]
    return fit_soft_adapter(
        client,
        core_dir,
        SmilesFingerprintAdapter(),
        (train, np.array([labels[s] for s in train])),
        (held, np.array([labels[s] for s in held])),
        task="regression",
        target="tpsa",
        name="fingerprint",
        version=version,
        steps=steps,
        training_data={"source": "rdkit/Data/NCI/first_5k.tpsa.csv", "split": "the demo model's own split"},
        progress=progress,
    )
