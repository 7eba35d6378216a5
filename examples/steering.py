"""Intermediary access, steering: a vector added to the residual stream changes what the model
generates, with no change to its weights and no other user affected.

The vector is the difference of mean activations (after layer 1) between aromatic and aliphatic
molecules, captured through the pool; then 32 molecules are sampled from "C" with and without it.

Run: .venv/bin/python examples/steering.py
"""

import numpy as np

import tpmflow

AROMATIC = ["c1ccccc1", "Cc1ccccc1", "Oc1ccccc1", "c1ccc2ccccc2c1", "Nc1ccccc1", "c1ccncc1"]
ALIPHATIC = ["CCCCCC", "CCCCCCC", "CCCCO", "C1CCCCC1", "CCCCN", "CC(C)CCC"]
LAYER, SCALE, SAMPLES = 1, 0.75, 32


def mean_state(client, molecules):  # type: ignore[no-untyped-def]
    site = f"blocks.{LAYER}.hook_resid_post"
    return np.mean(
        [client.probe(m, capture=[tpmflow.Capture(site=site)])[site].mean(axis=0) for m in molecules], axis=0
    )


def aromatic_share(texts: list[str]) -> float:
    return sum("c" in t for t in texts) / len(texts)  # lowercase c: an aromatic carbon


def valid_share(texts: list[str]) -> float:
    from tpmflow_smiles import SmilesAdapter

    return sum(d.value is not None for d in SmilesAdapter().decode(texts)) / len(texts)


def main() -> None:
    with tpmflow.Pool.from_config("configs/local.yaml") as pool, pool.client() as client:
        vector = (mean_state(client, AROMATIC) - mean_state(client, ALIPHATIC)).astype(np.float32)
        steer = [tpmflow.Add(site="hook_resid_post", layer=LAYER, vector=vector, scale=SCALE)]
        plain, steered = [], []
        for seed in range(SAMPLES):
            plain.append("C" + client.probe("C", max_tokens=30, temperature=1.0, seed=seed).text.split("\n")[0])
            steered.append(
                "C"
                + client.probe("C", interventions=steer, max_tokens=30, temperature=1.0, seed=seed).text.split("\n")[0]
            )
    print(f"with aromatic carbons: {aromatic_share(plain):.0%} without steering, {aromatic_share(steered):.0%} with it")
    print(f"valid, unique molecules: {valid_share(plain):.0%} without, {valid_share(steered):.0%} with")
    for a, b in list(zip(plain, steered, strict=True))[:5]:
        print(f"  {a:32s} -> {b}")


if __name__ == "__main__":
    main()
