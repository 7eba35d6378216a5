"""``SmilesAdapter``: RDKit in, canonical molecules out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tpmflow.adapters import AdapterFit, Decoded, EncodedText, ItemError

# Atoms, bonds, branches, rings, charges, isotopes, stereo: everything a SMILES string may contain.
_SMILES_CHARS = frozenset("ABCDEFGHIKLMNOPRSTUVWXYZabcdefghiklmnoprstuy0123456789[]()=#$:/\\.+-@%*")


@dataclass(frozen=True)
class SmilesSettings:
    """What ``config()`` carries; every field has a safe default."""

    template: str = "{smiles}"
    max_chars: int = 1000  # refuse before parsing: RDKit on megabyte strings is a denial of service
    max_heavy_atoms: int = 150
    fingerprint_radius: int = 2
    fingerprint_bits: int = 2048
    context_properties: bool = True  # retrieved molecules' properties in the context (a SMILES-only model: off)


class SmilesAdapter:
    """Molecules as SMILES or InChI; the text route for the core model, Morgan fingerprints as
    features, and decoding of generated SMILES with a reason for every reject."""

    name = "smiles"
    version = "0.1.0"
    modality = "molecule"
    fit = AdapterFit()  # the text route fits any core model; trained parts carry their own fit

    def __init__(self, settings: SmilesSettings | None = None) -> None:
        from rdkit import RDLogger

        RDLogger.DisableLog("rdApp.*")  # reasons are reported per item, not as log noise
        self.settings = settings or SmilesSettings()
        if "{smiles}" not in self.settings.template:
            raise ValueError("template must contain {smiles}")

    # -- config --------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return asdict(self.settings)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SmilesAdapter:
        return cls(SmilesSettings(**config))

    # -- parsing -------------------------------------------------------------------------------

    def parse(self, item: Any) -> Any:
        """An RDKit molecule, or a ``str`` reason why the item is not one."""
        from rdkit import Chem

        if not isinstance(item, str):
            return f"expected a SMILES or InChI string, got {type(item).__name__}"
        text = item.strip()
        if not text:
            return "empty string"
        if len(text) > self.settings.max_chars:
            return f"{len(text)} characters exceeds the limit of {self.settings.max_chars}"
        if not text.isascii():  # SMILES and InChI are ASCII; a lone surrogate (valid in JSON) crashed RDKit's binding
            bad = next(c for c in text if not c.isascii())
            return f"SMILES and InChI are ASCII text, got {bad!r} at position {text.index(bad)}"
        mol = Chem.MolFromInchi(text) if text.startswith("InChI=") else Chem.MolFromSmiles(text)
        if mol is None or mol.GetNumAtoms() == 0:
            return "not a molecule RDKit can parse and sanitise"
        if mol.GetNumHeavyAtoms() > self.settings.max_heavy_atoms:
            return f"{mol.GetNumHeavyAtoms()} heavy atoms exceeds the limit of {self.settings.max_heavy_atoms}"
        return mol

    def canonical(self, items: Sequence[Any]) -> list[str | ItemError]:
        """Canonical SMILES per item, or the item's error."""
        from rdkit import Chem

        out: list[str | ItemError] = []
        for i, item in enumerate(items):
            mol = self.parse(item)
            out.append(ItemError(i, mol) if isinstance(mol, str) else Chem.MolToSmiles(mol))
        return out

    # -- routes --------------------------------------------------------------------------------

    def encode(self, items: Sequence[Any]) -> list[EncodedText | ItemError]:
        """Text route: each molecule's canonical SMILES in the prompt template."""
        return [
            c if isinstance(c, ItemError) else EncodedText(self.settings.template.format(smiles=c))
            for c in self.canonical(items)
        ]

    def encode_prefix(self, items: Sequence[Any]) -> list[EncodedText | ItemError]:
        """Generation prompts: a SMILES prefix (a fragment need not parse; "" is unconditional). Only
        characters SMILES uses are allowed, so a prompt cannot smuggle instructions or huge text."""
        out: list[EncodedText | ItemError] = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                out.append(ItemError(i, f"expected a SMILES prefix string, got {type(item).__name__}"))
            elif len(item) > self.settings.max_chars:
                out.append(ItemError(i, f"{len(item)} characters exceeds the limit of {self.settings.max_chars}"))
            elif bad := sorted(set(item) - _SMILES_CHARS):
                out.append(ItemError(i, f"characters not used in SMILES: {''.join(bad)!r}"))
            else:
                out.append(EncodedText(item))
        return out

    def retrieval_context(self, entries: Sequence[tuple[Any, dict[str, Any]]]) -> str:
        """Retrieved molecules before a generation prefix: one canonical SMILES per line, followed by
        its scalar properties (``CCO qed=0.41``; none with ``context_properties=False``, for a model
        that knows only SMILES), so the model continues after molecules like them.
        An entry that does not parse is left out (a collection may hold items of another kind)."""
        from tpmflow.knowledge.context import scalar_properties

        lines = []
        for smiles, metadata in zip(self.canonical([item for item, _ in entries]), entries, strict=True):
            if isinstance(smiles, str):
                props = scalar_properties(metadata[1]) if self.settings.context_properties else ""
                lines.append(f"{smiles} {props}" if props else smiles)
        return "".join(line + "\n" for line in lines)

    def fingerprints(self, items: Sequence[Any]) -> tuple[np.ndarray, list[ItemError]]:
        """Morgan fingerprints [n, bits] (float32 0/1; rows of bad items are zero) and the errors."""
        from rdkit.Chem import rdFingerprintGenerator

        gen = rdFingerprintGenerator.GetMorganGenerator(
            radius=self.settings.fingerprint_radius, fpSize=self.settings.fingerprint_bits
        )
        out = np.zeros((len(items), self.settings.fingerprint_bits), dtype=np.float32)
        errors: list[ItemError] = []
        for i, item in enumerate(items):
            mol = self.parse(item)
            if isinstance(mol, str):
                errors.append(ItemError(i, mol))
            else:
                out[i] = gen.GetFingerprintAsNumPy(mol)
        return out, errors

    def decode(self, texts: Sequence[str]) -> list[Decoded]:
        """Generated texts into valid, unique, canonical molecules; rejects say why."""
        seen: dict[str, int] = {}
        out: list[Decoded] = []
        for i, text in enumerate(texts):
            mol = self.parse(text)
            if isinstance(mol, str):
                out.append(Decoded(text, None, mol))
                continue
            from rdkit import Chem

            smiles = Chem.MolToSmiles(mol)
            if smiles in seen:
                out.append(Decoded(text, None, f"duplicate of output {seen[smiles]}"))
            else:
                seen[smiles] = i
                out.append(Decoded(text, smiles))
        return out
