"""Molecules drawn for the workbench: RDKit SVGs made in the adapters' sandbox (fresh, capped
interpreters, ``tpmflow.adapters.sandbox``), never in the gateway process. SMILES are untrusted
input, and RDKit's ``Chem`` crashes (SIGSEGV) in a process that has already loaded usearch, which
the gateway's knowledge store does.

The SVG goes to the page as a ``data:image/svg+xml`` URL for an ``<img>``: an image cannot run
script, whatever text RDKit wrote into it.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from tpmflow.adapters.base import ItemError
from tpmflow.adapters.sandbox import Caps, run_capped

MAX_MOLECULES = 64  # per drawing request
MAX_SMILES_CHARS = 400
DRAW_CAPS = Caps(seconds=10.0, memory_bytes=2 << 30)
SIZE = (220, 150)


def svg_of(smiles: str) -> str:
    """One molecule as SVG (runs in the sandbox's child)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Draw import rdMolDraw2D

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError("RDKit cannot read this SMILES")
    drawer = rdMolDraw2D.MolDraw2DSVG(*SIZE)
    drawer.drawOptions().clearBackground = False
    drawer.DrawMolecule(mol)
    drawer.FinishDrawing()
    return str(drawer.GetDrawingText())


def draw(smiles: Sequence[str]) -> list[dict[str, str]]:
    """Per SMILES ``{"image": data URL}`` or ``{"error": why}``, in order; one sandbox call."""
    out: list[dict[str, str]] = [{} for _ in smiles]
    jobs: list[str] = []
    where: list[int] = []
    for i, s in enumerate(smiles):
        if not isinstance(s, str) or not s.strip():
            out[i] = {"error": "empty"}
        elif len(s) > MAX_SMILES_CHARS:
            out[i] = {"error": f"longer than {MAX_SMILES_CHARS} characters"}
        else:
            jobs.append(s.strip())
            where.append(i)
    if jobs:
        for i, result in zip(where, run_capped(svg_of, jobs, DRAW_CAPS, workers=1, per_child=MAX_MOLECULES), strict=True):
            if isinstance(result, ItemError):
                out[i] = {"error": result.reason.removeprefix("ValueError: ")}
            else:
                out[i] = {"image": "data:image/svg+xml;base64," + base64.b64encode(str(result).encode()).decode()}
    return out
