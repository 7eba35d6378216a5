"""RDKit's shipped NCI SMILES set, canonicalised, with a fixed held-out split.

The split depends only on ``SPLIT_SEED`` and the file, never on the training seed, so every later
issue (heads, surrogates) can rely on the same held-out molecules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLIT_SEED = 20231113
HELDOUT_FRACTION = 0.10
MAX_SMILES_CHARS = 126  # + <s> and </s> = 128 positions


def nci_smiles_path() -> Path:
    """``rdkit/Data/NCI/first_5K.smi`` inside the installed RDKit."""
    from rdkit import RDConfig

    return Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


@dataclass(frozen=True)
class SmilesSplit:
    """Canonical SMILES for training and held-out evaluation, with their line numbers in the file."""

    source: str
    train: list[str]
    heldout: list[str]
    train_lines: list[int]
    heldout_lines: list[int]
    dropped_unparsable: int
    dropped_too_long: int
    dropped_duplicates: int


def canonical(smiles: str) -> str | None:
    """RDKit canonical SMILES, or ``None`` when RDKit cannot parse it (empty strings included)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    if not smiles.strip():
        return None
    mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        return None
    return Chem.MolToSmiles(mol)


def load_split(path: Path | None = None) -> SmilesSplit:
    """Read, canonicalise, deduplicate, filter and split the NCI set (10% held out, fixed seed).

    Duplicates (the same canonical molecule on several lines) keep their first line only, so no
    molecule can sit on both sides of the split.
    """
    path = path or nci_smiles_path()
    rows: list[tuple[int, str]] = []
    seen: set[str] = set()
    unparsable = too_long = duplicates = 0
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        can = canonical(line.split()[0])
        if can is None:
            unparsable += 1
        elif len(can) > MAX_SMILES_CHARS:
            too_long += 1
        elif can in seen:
            duplicates += 1
        else:
            seen.add(can)
            rows.append((lineno, can))
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    n_heldout = round(len(rows) * HELDOUT_FRACTION)
    held = sorted(order[:n_heldout].tolist())
    train = sorted(order[n_heldout:].tolist())
    return SmilesSplit(
        source=f"rdkit/Data/NCI/{path.name}",
        train=[rows[i][1] for i in train],
        heldout=[rows[i][1] for i in held],
        train_lines=[rows[i][0] for i in train],
        heldout_lines=[rows[i][0] for i in held],
        dropped_unparsable=unparsable,
        dropped_too_long=too_long,
        dropped_duplicates=duplicates,
    )
