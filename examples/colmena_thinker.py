"""A Colmena thinker with a TPM agent and a simulation agent that do not wait for each other.

Run: .venv/bin/python examples/colmena_thinker.py [MODEL]   (default: the demo SMILES model)

``TPMThinker`` gives every agent ``self.tpm`` (a pool client) and ``submit_tpm``, which returns at
once and delivers the pool's answer to a ``@result_processor(topic="tpm")`` as a Colmena
``Result``. While the model generates (batch after batch, until the simulations are done), the
simulation agent keeps submitting and receiving RDKit/MMFF94 simulations through a ParslTaskServer on a local HTEX. The last line
printed is a JSON summary (the test suite reads it).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from colmena.models.results import Result
from colmena.task_server import ParslTaskServer
from colmena.thinker import agent, result_processor
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.providers import LocalProvider

import tpmflow
from tpmflow.colmena import SafePipeQueues, TPMThinker

REPO = Path(__file__).resolve().parents[1]
MOLECULES = [
    "CCO",
    "c1ccccc1O",
    "CC(=O)Nc1ccc(O)cc1",
    "O=C(O)c1ccccc1",
    "CCN(CC)CC",
    "CC(C)O",
    "Nc1ccccc1",
    "CCOC(C)=O",
]


class TwoAgents(TPMThinker):
    def __init__(self, queues: SafePipeQueues, **kwargs: Any) -> None:
        super().__init__(queues, **kwargs)
        self.tpm_done = threading.Event()
        self.workers_up = threading.Event()  # HTEX workers take seconds to start the first time
        self.simulations_done = threading.Event()
        self.events: list[tuple[str, float]] = []  # (what, when)
        self.batches = 0

    def _ask(self) -> None:
        """One batch of long generations: submitted, and the calling agent is free at once."""
        self.events.append(("tpm submitted", time.monotonic()))
        self.submit_tpm("generate", ["c1ccccc1"] * 16, max_tokens=240, ignore_eos=True, temperature=1.0, seed=1)

    @agent(startup=True)
    def ask_the_model(self) -> None:
        self.workers_up.wait()
        self._ask()

    @result_processor(topic="tpm")
    def model_answered(self, result: Result) -> None:
        """Keeps the model busy with one batch after another until the simulations are done (on a
        fast machine one batch can end before the second simulation does)."""
        assert result.success, result.failure_info
        self.events.append(("tpm answered", time.monotonic()))
        self.batches += 1
        first = result.value[0].text
        print(f"model: {len(result.value)} completions, e.g. c1ccccc1{first[:50]}… ({result.time.running:.1f} s)")
        if self.simulations_done.is_set():
            self.tpm_done.set()
        else:
            self._ask()

    @agent
    def simulate_molecules(self) -> None:
        """Simulations one after another, each waited for, while the model works."""
        self.queues.send_inputs("C", method="simulate", topic="simulate")  # wakes the workers
        self.queues.get_result(topic="simulate")
        self.workers_up.set()
        for smiles in MOLECULES:
            self.queues.send_inputs(smiles, method="simulate", topic="simulate")
            result = self.queues.get_result(topic="simulate")
            assert result is not None and result.success, result
            self.events.append(("simulation", time.monotonic()))
            print(f"simulated {smiles}: objective {result.value['objective']:.3f}")
        self.simulations_done.set()
        self.tpm_done.wait()


def main() -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    sys.path.insert(0, str(REPO))  # the simulation lives in the campaign app
    from apps.molecular_design.simulate import simulate

    with tpmflow.Pool.from_config(
        REPO / "configs" / "local.yaml", **({"model": sys.argv[1]} if len(sys.argv) > 1 else {})
    ) as pool:
        queues = SafePipeQueues(topics=["simulate", "tpm"])
        config = Config(
            executors=[HighThroughputExecutor(max_workers_per_node=1, provider=LocalProvider(init_blocks=1))],
            run_dir=str(REPO / "runs" / "colmena_thinker"),
        )
        server = ParslTaskServer([simulate], queues, config)
        server.start()
        try:
            thinker = TwoAgents(queues, url=pool.url, token=pool.token)
            thinker.start()
            thinker.join()
        finally:
            queues.send_kill_signal()
            server.join()
    submitted = [t for what, t in thinker.events if what == "tpm submitted"]
    answered = [t for what, t in thinker.events if what == "tpm answered"]
    busy = list(zip(submitted, answered, strict=True))  # one batch at a time: its (start, end)
    during = sum(
        1 for what, t in thinker.events if what == "simulation" and any(start < t < end for start, end in busy)
    )
    print(f"{during} of {len(MOLECULES)} simulations finished while the model was generating ({len(busy)} batches)")
    print(json.dumps({"simulations": len(MOLECULES), "during_generation": during, "batches": len(busy)}))


if __name__ == "__main__":
    main()
