"""Query-only mode: prompt in, text out — through tpmflow's client and through the `openai` package.

Run: .venv/bin/python examples/query_only.py   (starts a local pool of the demo SMILES model)
"""

import tpmflow


def main() -> None:
    with tpmflow.Pool.from_config("configs/local.yaml") as pool, pool.client() as client:
        # tpmflow's client: one prompt -> one Generation (a list -> a list); seeds make it reproducible.
        out = client.generate("c1ccccc1", max_tokens=40, temperature=1.0, seed=7)
        print("completion:", "c1ccccc1" + out.text, out.usage)

        # Non-blocking, as a thinker agent would call it.
        futures = [client.submit_generate("CC(=O)", max_tokens=40, seed=s) for s in range(4)]
        print("futures:", ["CC(=O)" + f.result().text for f in futures])

        # Any OpenAI-compatible client works unchanged against the gateway.
        from openai import OpenAI

        oa = OpenAI(base_url=pool.url + "/v1", api_key=pool.token)
        comp = oa.completions.create(model="smiles-llama", prompt="O=C(N", max_tokens=40, seed=3)
        print("openai:", "O=C(N" + comp.choices[0].text)
        print("ledger:", client.usage())


if __name__ == "__main__":
    main()
