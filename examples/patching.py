"""Intermediary access, activation patching: where in the network does the model decide between a
clean and a corrupted prompt? The clean run's residual stream is patched into the corrupted run,
one layer and position at a time, and the clean prediction's probability is read with the lens.

The same mechanism serves **blocks of layers** on your own activations (the vision paper's
"serve blocks of layers"): ``Replace`` at ``blocks.i.hook_resid_pre`` with your [positions, hidden]
array plus ``Capture`` at ``blocks.j.hook_resid_post`` runs layers i..j on it and returns the result.

Run: .venv/bin/python examples/patching.py
"""

import numpy as np

import tpmflow

CLEAN, CORRUPT = "c1ccccc1", "C1CCCCC1"  # the same length: positions line up


def main() -> None:
    with tpmflow.Pool.from_config("configs/local.yaml") as pool, pool.client() as client:
        n_layers = 4
        resid = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
        clean = client.probe(
            CLEAN, capture=[tpmflow.Capture(site=s) for s in resid], lens=tpmflow.LogitLens(layers=[n_layers - 1])
        )
        target = clean.lens[-1]["token_ids"][-1][0]  # the clean run's next token after the prompt
        n = len(clean.prompt_tokens)
        effect = np.zeros((n_layers, n))
        for layer in range(n_layers):
            for pos in range(n):
                patch = tpmflow.Replace(site=resid[layer], values=clean[resid[layer]][pos : pos + 1], positions=[pos])
                run = client.probe(
                    CORRUPT, interventions=[patch], lens=tpmflow.LogitLens(layers=[n_layers - 1], top_k=50)
                )
                last = run.lens[-1]
                ids, probs = last["token_ids"][-1], last["probs"][-1]
                effect[layer, pos] = probs[ids.index(target)] if target in ids else 0.0
    print(
        f"P(clean next token {clean.lens[-1]['tokens'][-1][0]!r}) in the corrupted run, patched at (layer, position):"
    )
    print("        " + " ".join(f"{t:>6s}" for t in clean.prompt_tokens))
    for layer in range(n_layers):
        print(f"layer {layer} " + " ".join(f"{v:6.3f}" for v in effect[layer]))


if __name__ == "__main__":
    main()
