"""The pool from a Parsl workflow: ``@tpm_app`` functions get a client and run as ordinary Parsl
tasks on a HighThroughputExecutor, here two at a time beside the pool's replica.

Run: .venv/bin/python examples/parsl_app.py
"""

import os
import sys

import parsl
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

import tpmflow
from tpmflow.parsl import tpm_app


@tpm_app(executors=["work"])
def canonical_and_embedded(client, smiles):  # type: ignore[no-untyped-def]
    # Runs on a Parsl worker: defined in this script, so it travels by value.
    out = client.embed(smiles, adapter="smiles")
    return {
        s: ("error: " + str(item)) if i in [e.item for e in out.errors] else round(float(abs(out[i]).mean()), 4)
        for i, (s, item) in enumerate(zip(smiles, out.items, strict=True))
    }


def main() -> None:
    # HTEX starts its interchange and workers from the environment's bin/: put it on PATH.
    os.environ["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
    config = Config(
        executors=[
            HighThroughputExecutor(
                label="work", max_workers_per_node=2, address="127.0.0.1", provider=LocalProvider(init_blocks=1)
            )
        ],
        run_dir="runinfo",
    )
    with tpmflow.Pool.from_config("configs/local.yaml") as pool:
        os.environ["TPMFLOW_URL"], os.environ["TPMFLOW_TOKEN"] = pool.url, pool.token
        dfk = parsl.load(config)
        try:
            futures = [canonical_and_embedded(batch) for batch in (["CCO", "OCC"], ["c1ccccc1", "not a molecule"])]
            for future in futures:
                print(future.result())
        finally:
            dfk.cleanup()
            parsl.clear()


if __name__ == "__main__":
    main()
