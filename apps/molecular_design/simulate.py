"""The campaign's simulation: a real force-field calculation per molecule, run as a Parsl task.

RDKit embeds up to ``CONFORMERS`` 3-D conformers (ETKDGv3) and optimises each with the MMFF94
force field; the lowest-energy conformer's dipole moment is computed from its MMFF94 partial
charges. The objective is that dipole divided by the square root of the heavy-atom count: a sum
of N randomly oriented bond dipoles grows like √N, so the normalisation keeps the objective from
being won by size alone (and tiny molecules do not win by default either).

Molecules without a defined dipole (a net charge makes it depend on the origin), several
fragments, no conformer or no MMFF94 parameters are failures with a reason, never an exception.
"""

from __future__ import annotations

import math
import time
from typing import Any

CONFORMERS = 4
DEBYE_PER_E_ANGSTROM = 4.80320


def simulate(smiles: str, seed: int = 0) -> dict[str, Any]:
    """One molecule → {objective, dipole_debye, energy_kcal, heavy_atoms, seconds, error}."""
    # Parsl ships this function to a worker: import there.
    import numpy as np
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem, rdForceFieldHelpers

    RDLogger.DisableLog("rdApp.*")
    started = time.perf_counter()
    out: dict[str, Any] = {"objective": math.nan, "dipole_debye": math.nan, "energy_kcal": math.nan}

    def failed(reason: str) -> dict[str, Any]:
        return {**out, "error": reason, "seconds": time.perf_counter() - started}

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return failed("RDKit cannot parse the SMILES")
    out["heavy_atoms"] = mol.GetNumHeavyAtoms()
    if len(Chem.GetMolFrags(mol)) > 1:
        return failed("several fragments: no single molecule to optimise")
    if Chem.GetFormalCharge(mol) != 0:
        return failed("net charge: the dipole moment depends on the origin")
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    conf_ids = list(AllChem.EmbedMultipleConfs(mol, numConfs=CONFORMERS, params=params))
    if not conf_ids:
        return failed("ETKDG found no 3-D conformer")
    props = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol)
    if props is None:
        return failed("no MMFF94 parameters for this molecule")
    results = rdForceFieldHelpers.MMFFOptimizeMoleculeConfs(mol, maxIters=500)
    energies = [energy if converged in (0, 1) else math.inf for converged, energy in results]
    best = int(np.argmin(energies))
    if not math.isfinite(energies[best]):
        return failed("MMFF94 optimisation failed on every conformer")
    charges = np.array([props.GetMMFFPartialCharge(i) for i in range(mol.GetNumAtoms())])
    coords = mol.GetConformer(conf_ids[best]).GetPositions()
    dipole = float(np.linalg.norm(charges @ coords)) * DEBYE_PER_E_ANGSTROM
    out.update(
        objective=dipole / math.sqrt(out["heavy_atoms"]),
        dipole_debye=dipole,
        energy_kcal=float(energies[best]),
        error="",
        seconds=time.perf_counter() - started,
    )
    return out
