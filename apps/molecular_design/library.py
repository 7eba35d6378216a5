"""Candidate molecules: RDKit's shipped NCI 5K set, canonical, neutral and single-fragment."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def nci_smiles_path() -> Path:
    from rdkit import RDConfig

    return Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"


def load_library(max_heavy_atoms: int = 40, min_heavy_atoms: int = 4) -> list[str]:
    """Canonical SMILES of the NCI 5K molecules the simulation can take, deduplicated, in file order."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    seen: dict[str, None] = {}
    for line in nci_smiles_path().read_text().splitlines():
        mol = Chem.MolFromSmiles(line.split()[0]) if line.strip() else None
        if mol is None or len(Chem.GetMolFrags(mol)) > 1 or Chem.GetFormalCharge(mol) != 0:
            continue
        if min_heavy_atoms <= mol.GetNumHeavyAtoms() <= max_heavy_atoms:
            seen.setdefault(Chem.MolToSmiles(mol), None)
    return list(seen)


def fingerprints(smiles: list[str], bits: int = 2048) -> np.ndarray:
    """Morgan (ECFP4) bit vectors: the no-TPM surrogate's features."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=bits)
    out = np.zeros((len(smiles), bits), dtype=np.float32)
    for i, smi in enumerate(smiles):
        mol = Chem.MolFromSmiles(smi)
        if mol is not None:
            out[i] = gen.GetFingerprintAsNumPy(mol)
    return out


def prefixes_of(smiles: str, fractions: tuple[float, ...] = (0.4, 0.6)) -> list[str]:
    """Leading fragments of a canonical SMILES, the prompts that condition an unconditional model."""
    return sorted({smiles[: max(1, round(len(smiles) * f))] for f in fractions})
