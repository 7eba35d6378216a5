"""Intermediary access, the logit lens: what the model would predict after each layer, for every
position of a prompt, computed inside the serving engine (as in Figure 3 of the vision paper).

Run: .venv/bin/python examples/logit_lens.py [PROMPT]   ->  writes logit_lens.png
"""

import sys

import numpy as np

import tpmflow


def main(prompt: str = "CC(=O)Oc1ccccc1C(=O)O") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tpmflow.Pool.from_config("configs/local.yaml") as pool, pool.client() as client:
        trace = client.probe(prompt, lens=tpmflow.LogitLens(top_k=1))
    tokens = trace.prompt_tokens
    top = trace.top_tokens()  # [layer][position]
    probs = np.array([[row[0] for row in layer["probs"]] for layer in trace.lens])
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(tokens), 1 + 0.6 * len(top)))
    ax.imshow(probs, cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="lower")
    for layer, row in enumerate(top):
        for pos, token in enumerate(row):
            ax.text(pos, layer, token, ha="center", va="center", color="white" if probs[layer, pos] < 0.6 else "black")
    ax.set_xticks(range(len(tokens)), tokens)
    ax.set_yticks(range(len(top)), [f"layer {lens['layer']}" for lens in trace.lens])
    ax.set_xlabel("input position (the cell shows the predicted next token)")
    ax.set_title(f"logit lens on {trace.provenance['model']}: top-1 token and its probability")
    fig.colorbar(ax.images[0], ax=ax, label="probability")
    fig.tight_layout()
    fig.savefig("logit_lens.png", dpi=120)
    print("wrote logit_lens.png;", "last layer's guesses:", "".join(top[-1]))


if __name__ == "__main__":
    main(*sys.argv[1:2])
