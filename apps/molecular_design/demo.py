"""`make demo` today: the trained SMILES model generating molecules through vLLM.

Until the campaign issue lands, this shows the demo model's card and molecules it proposes
through vLLM's CPU build, unconditioned and conditioned by a prefix (the way the campaign will
steer it), each checked by RDKit.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from tpmflow.models.card import read_card
from tpmflow.models.catalog import DEMO_MODEL, model_path
from tpmflow.models.smiles_data import canonical

PREFIXES = ["", "c1ccccc1", "O=C(N", "CC(C)"]
PER_PREFIX = 8


def main() -> None:
    from rdkit import Chem
    from rdkit.Chem import Descriptors, rdMolDescriptors
    from vllm import SamplingParams

    from tpmflow.models.offline_engine import open_offline_engine

    console = Console()
    path = model_path(DEMO_MODEL)
    card = read_card(path)
    m = card.metrics or {}
    console.print(f"[bold]{card.name}[/] {card.parameters:,} parameters, {card.content_hash}")
    console.print(
        f"held-out loss {m.get('heldout_loss', float('nan')):.3f} nats/token "
        f"(unigram baseline {m.get('unigram_heldout_loss', float('nan')):.3f}); "
        f"validity {m.get('validity', 0):.2f}, uniqueness {m.get('uniqueness', 0):.2f}, "
        f"novelty {m.get('novelty', 0):.2f} over {m.get('n', 0)} samples at T=1.0"
    )
    with console.status("starting vLLM (CPU build)…"):
        llm = open_offline_engine(path)
    train = set(__import__("json").loads((path / "split.json").read_text())["train"])
    table = Table(title="molecules proposed through vLLM")
    for col in ("prefix", "SMILES (canonical)", "heavy atoms", "MW", "TPSA", "novel"):
        table.add_column(col)
    started = time.monotonic()
    valid = total = 0
    for prefix in PREFIXES:
        params = [SamplingParams(temperature=1.0, max_tokens=120, seed=1000 + i) for i in range(PER_PREFIX)]
        outs = llm.generate([prefix or {"prompt_token_ids": [1]} for _ in range(PER_PREFIX)], params, use_tqdm=False)
        seen: set[str] = set()
        for out in outs:
            total += 1
            smi = canonical(prefix + out.outputs[0].text)
            if smi is None or smi in seen:
                continue
            valid += 1
            seen.add(smi)
            mol = Chem.MolFromSmiles(smi)
            table.add_row(
                prefix or "(none)",
                smi,
                str(mol.GetNumHeavyAtoms()),
                f"{Descriptors.MolWt(mol):.1f}",
                f"{rdMolDescriptors.CalcTPSA(mol):.1f}",
                "yes" if smi not in train else "no",
            )
    console.print(table)
    console.print(
        f"{valid} distinct valid molecules of {total} samples in {time.monotonic() - started:.1f} s. "
        "The TPM-steered campaign (issue 6) will replace this demo."
    )


if __name__ == "__main__":
    main()
