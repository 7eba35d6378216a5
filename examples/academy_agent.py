"""The pool from Academy agents: a ``TPMAgent`` serves the pool's calls as actions; the main program
and another agent call them through handles, many at once, without blocking anyone's event loop.

Run: .venv/bin/python examples/academy_agent.py [MODEL]   (default: the demo SMILES model of
configs/local.yaml; `tiny-llama` also works). Needs the `academy` extra (academy-py).
"""

import asyncio
import sys

import numpy as np
from academy.agent import Agent, action
from academy.exchange import LocalExchangeFactory
from academy.handle import Handle
from academy.manager import Manager

import tpmflow
from tpmflow.academy import TPMAgent


class Chemist(Agent):
    """A campaign agent: proposes molecules with the pool's SMILES adapter and embeds the valid ones."""

    def __init__(self, tpm: Handle[TPMAgent]) -> None:
        super().__init__()
        self.tpm = tpm

    @action
    async def propose(self, prefix: str, n: int) -> dict[str, list[float]]:
        """``n`` molecules starting with ``prefix``: canonical SMILES → first 3 embedding dims."""
        (decoded,) = await self.tpm.generate([prefix], adapter="smiles", n=n, max_tokens=24, seed=11)
        molecules = sorted({d.value for d in decoded if d.ok})
        if not molecules:
            return {}
        emb = await self.tpm.embed(molecules, adapter="smiles")
        return {m: np.round(emb[i][:3], 3).tolist() for i, m in enumerate(molecules) if i in emb.ok}


async def campaign(url: str, token: str) -> None:
    async with await Manager.from_exchange_factory(LocalExchangeFactory()) as manager:
        tpm = await manager.launch(TPMAgent, kwargs={"url": url, "token": token})
        chemist = await manager.launch(Chemist, args=(tpm,))

        print("models:", await tpm.models())
        out = await tpm.generate("c1ccccc1", max_tokens=24, temperature=1.0, seed=7)
        print("completion:", "c1ccccc1" + out.text, out.usage)

        # Actions are coroutines on the agent's loop: these four run at once and the pool batches them.
        gens = await asyncio.gather(*(tpm.generate("CC(=O)", max_tokens=24, seed=s) for s in range(4)))
        print("concurrent:", ["CC(=O)" + g.text for g in gens])

        emb = await tpm.embed(["CCO", "not a molecule", "OCC"], adapter="smiles")
        print("embeddings ok:", emb.ok, "errors:", [(e.item, e.message) for e in emb.errors])
        print("same molecule, same vector:", bool(np.allclose(emb[0], emb[2])))

        # A typed tpmflow error reaches the caller; the agent stays up for the next call.
        try:
            await tpm.embed(["CCO"], adapter="no-such-adapter")
        except tpmflow.InvalidRequest as exc:
            print("typed error:", type(exc).__name__, exc)
        print("another agent:", await chemist.propose("c1ccccc1", 4))
    # Leaving the manager shuts both agents down; TPMAgent closes its pool client.


def main() -> None:
    overrides = {"model": sys.argv[1]} if len(sys.argv) > 1 else {}
    with tpmflow.Pool.from_config("configs/local.yaml", **overrides) as pool:
        assert pool.token is not None
        asyncio.run(campaign(pool.url, pool.token))


if __name__ == "__main__":
    main()
