"""SYNTHETIC training data: random sequences and their GRAVY score (mean Kyte-Doolittle
hydropathy), a target computed from the sequence itself. Enough to train and check the plumbing;
it says nothing about real proteins. Replace it with your own data."""

from __future__ import annotations

import numpy as np

# Kyte & Doolittle (1982) hydropathy index.
KYTE_DOOLITTLE = {
    "A": 1.8, "R": -4.5, "N": -3.5, "D": -3.5, "C": 2.5, "Q": -3.5, "E": -3.5, "G": -0.4, "H": -3.2, "I": 4.5,
    "L": 3.8, "K": -3.9, "M": 1.9, "F": 2.8, "P": -1.6, "S": -0.8, "T": -0.7, "W": -0.9, "Y": -1.3, "V": 4.2,
}  # fmt: skip
_HYDROPHOBIC = "AILMFVCW"
_POLAR = "RNDQEGHKPSTY"


def gravy(sequence: str) -> float:
    """Grand average of hydropathy: the mean Kyte-Doolittle value of the residues."""
    return float(np.mean([KYTE_DOOLITTLE[a] for a in sequence]))


def make_sequences(n: int, seed: int, max_length: int = 64) -> tuple[list[str], np.ndarray]:
    """``n`` random sequences (8 to ``max_length`` residues, each with its own hydrophobic fraction)
    and their GRAVY scores."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(n):
        length = int(rng.integers(8, max_length + 1))
        hydrophobic = rng.random(length) < rng.random()
        sequences.append(
            "".join(rng.choice(list(_HYDROPHOBIC)) if h else rng.choice(list(_POLAR)) for h in hydrophobic)
        )
    return sequences, np.array([gravy(s) for s in sequences])
