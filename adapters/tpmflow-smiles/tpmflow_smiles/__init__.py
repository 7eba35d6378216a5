"""tpmflow's molecule adapter (see README.md)."""

from tpmflow_smiles.adapter import SmilesAdapter

__all__ = ["SmilesAdapter"]
