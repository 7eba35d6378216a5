"""The pool's calls as ordinary Colmena tasks, in one queue with simulations.

Run: .venv/bin/python examples/colmena_tasks.py [MODEL]   (default: the demo SMILES model)

``tpm_methods`` gives a ``ParslTaskServer`` the methods ``tpm_generate``, ``tpm_embed``,
``tpm_predict`` and ``tpm_probe``; they take the client method's arguments. Here they run on a
thread executor (a TPM task only waits for the pool) beside RDKit simulations on a local HTEX.
The ``tpm`` topic sends inputs above 5 kB through a ProxyStore file store: Colmena proxies them,
the worker resolves them, and the pool receives plain data (big arrays as its own signed
references), never a pickled proxy.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from colmena.task_server import ParslTaskServer
from parsl.config import Config
from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor
from parsl.providers import LocalProvider
from proxystore.connectors.file import FileConnector
from proxystore.store import Store, register_store

import tpmflow
from tpmflow.colmena import SafePipeQueues, tpm_methods

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    sys.path.insert(0, str(REPO))
    from apps.molecular_design.library import load_library
    from apps.molecular_design.simulate import simulate

    overrides = {"model": sys.argv[1]} if len(sys.argv) > 1 else {}
    with (
        tpmflow.Pool.from_config(REPO / "configs" / "local.yaml", **overrides) as pool,
        tempfile.TemporaryDirectory() as scratch,
    ):
        store = Store("colmena-tasks", FileConnector(scratch))
        register_store(store)
        queues = SafePipeQueues(
            topics=["simulate", "tpm"], proxystore_name={"tpm": store.name}, proxystore_threshold={"tpm": 5_000}
        )
        config = Config(
            executors=[
                HighThroughputExecutor(label="sim", max_workers_per_node=1, provider=LocalProvider(init_blocks=1)),
                ThreadPoolExecutor(label="tpm", max_threads=4),
            ],
            run_dir=str(REPO / "runs" / "colmena_tasks"),
        )
        methods = [(simulate, {"executors": ["sim"]}), *tpm_methods(pool.url, pool.token, executors=["tpm"])]
        server = ParslTaskServer(methods, queues, config)
        server.start()
        try:
            molecules = load_library()[:250]  # ~9 kB of SMILES (one call takes 256 at most): above the threshold
            queues.send_inputs(molecules, method="tpm_embed", input_kwargs={"adapter": "smiles"}, topic="tpm")
            queues.send_inputs(
                "c1ccccc1", method="tpm_generate", input_kwargs={"max_tokens": 40, "seed": 3}, topic="tpm"
            )
            for smiles in molecules[:3]:
                queues.send_inputs(smiles, method="simulate", topic="simulate")
            for _ in range(2):
                result = queues.get_result(topic="tpm")
                assert result is not None and result.success, result.failure_info
                if result.method == "tpm_embed":
                    print(f"tpm_embed: {result.value.numpy(only_ok=True).shape} in {result.time.running:.2f} s")
                else:
                    print(f"tpm_generate: c1ccccc1{result.value.text}")
            for _ in range(3):
                result = queues.get_result(topic="simulate")
                assert result is not None
                print(f"simulate: {result.value['objective']:.3f} ({result.value['error'] or 'ok'})")
        finally:
            queues.send_kill_signal()
            server.join()
            store.close()


if __name__ == "__main__":
    main()
