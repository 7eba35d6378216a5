"""Customized-embeddings mode, the first half: final hidden states of the shared frozen core,
and generation from your own vectors (`prompt_embeds`), with big arrays by reference.

Run: .venv/bin/python examples/embeddings.py
"""

import numpy as np
from safetensors.numpy import load_file
from transformers import AutoTokenizer

import tpmflow
from tpmflow.versioning.checkout import replica_model_dir

MOLECULES = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "CCN(CC)CC"]


def main() -> None:
    with tpmflow.Pool.from_config("configs/local.yaml") as pool, pool.client() as client:
        emb = client.embed(MOLECULES, pooling="mean")
        vectors = emb.numpy()  # [4, hidden]
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        print("cosine similarity:\n", np.round(unit @ unit.T, 3))
        print("provenance:", emb.provenance["model"], emb.provenance["content_hash"][:20])

        # Per-token states; large outputs come back as references, fetched lazily from the store.
        per_token = client.embed("CC(=O)Oc1ccccc1C(=O)O", pooling="none")[0]
        print("per-token states:", per_token.shape)

        # Your own vectors in: here simply the model's own token embeddings, so the result matches text.
        model_dir = replica_model_dir(pool.cfg)  # the folder the replicas load
        table = load_file(str(model_dir / "model.safetensors"))["model.embed_tokens.weight"]
        ids = AutoTokenizer.from_pretrained(str(model_dir))("c1ccccc1")["input_ids"]
        ref = client.put(table[ids])  # into the pool's ProxyStore store; the gateway signs the reference
        out = client.generate(prompt_embeds=ref, max_tokens=30, temperature=0.0)
        print("from prompt_embeds:", "c1ccccc1" + out.text)


if __name__ == "__main__":
    main()
