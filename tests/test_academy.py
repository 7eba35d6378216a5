"""Academy integration against a real pool: ``TPMAgent``'s actions through handles of a real Academy
manager and local exchange, from the test (the main program) and from another agent."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from academy.agent import Agent, action
from academy.exchange import LocalExchangeFactory
from academy.handle import Handle
from academy.manager import Manager

from tpmflow.academy import TPMAgent
from tpmflow.client import Generation
from tpmflow.errors import AdapterInputError, InvalidRequest
from tpmflow.schema import Capture


def run_with_agent(
    pool: Any, body: Callable[[Manager[Any], Handle[TPMAgent]], Awaitable[Any]], agent: TPMAgent | None = None
) -> Any:
    """Start a manager on a local exchange, launch a TPMAgent on the pool, run ``body``, shut down."""

    async def main() -> Any:
        async with await Manager.from_exchange_factory(LocalExchangeFactory()) as manager:
            handle = await manager.launch(agent or TPMAgent(pool.url, pool.token))
            try:
                return await asyncio.wait_for(body(manager, handle), timeout=120)
            finally:
                await manager.shutdown(handle, blocking=True, timeout=30)

    return asyncio.run(main())


def test_actions_through_a_handle(pool: Any) -> None:
    async def body(manager: Manager[Any], tpm: Handle[TPMAgent]) -> None:
        assert await tpm.models() == ["tiny-llama"]
        gen = await tpm.generate("Academy", max_tokens=6, temperature=0.0, seed=1)
        assert isinstance(gen, Generation) and gen.usage["completion_tokens"] == 6
        # The same call straight through the client gives the same text: the agent adds nothing.
        with pool.client() as client:
            assert client.generate("Academy", max_tokens=6, temperature=0.0, seed=1).text == gen.text
        batch = await tpm.generate(["a", "b"], max_tokens=2)
        assert len(batch) == 2 and all(isinstance(g, Generation) for g in batch)  # usage is the request's

        emb = await tpm.embed(["CCO", "c1ccccc1O"])
        assert emb.numpy().shape == (2, 128) and np.isfinite(emb.numpy()).all()
        per_token = await tpm.embed("CC(=O)Oc1ccccc1C(=O)O", pooling="none")
        assert per_token[0].ndim == 2 and per_token[0].shape[1] == 128

        smiles = await tpm.embed(["CCO", "not a molecule", "OCC"], adapter="smiles")
        assert smiles.ok == [0, 2] and [e.item for e in smiles.errors] == [1]
        np.testing.assert_allclose(smiles[0], smiles[2], rtol=1e-6)  # OCC is CCO
        decoded = await tpm.generate(["", "c1ccccc1"], adapter="smiles", n=2, max_tokens=8, seed=3)
        assert len(decoded) == 2 and all(len(d) == 2 for d in decoded)

        # intermediary access: the same activations as a direct client's probe
        capture = [Capture(site="hook_resid_post", layers=[1])]
        trace = await tpm.probe("CCO", capture=capture)
        with pool.client() as client:
            direct = client.probe("CCO", capture=capture)["blocks.1.hook_resid_post"]
        np.testing.assert_allclose(trace["blocks.1.hook_resid_post"], direct, rtol=1e-5, atol=1e-6)

        described = await tpm.agent_describe()
        assert {"generate", "embed", "predict", "probe", "models"} <= set(described.actions)

    run_with_agent(pool, body)


def test_predict_through_a_handle(pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small TPSA head fitted on the pool's embeddings, served by name@version, called through the agent."""
    from tpmflow_smiles.tpsa import fit_tpsa_head, tpsa_labels

    from tpmflow.models.smiles_data import load_split

    monkeypatch.setenv("TPMFLOW_PARTS", pool.cfg.parts_path)
    split = load_split()
    with pool.client() as client:
        fit_tpsa_head(client, split.train[:96], split.heldout[:24], version="0.0.1-academy")
    labels = tpsa_labels()
    molecules = [s for s in split.heldout[:4] if s in labels]

    async def body(manager: Manager[Any], tpm: Handle[TPMAgent]) -> None:
        out = await tpm.predict([*molecules, "not a molecule"], adapter="smiles", head="tpsa@0.0.1-academy")
        assert out.ok == list(range(len(molecules))) and out.head["version"] == "0.0.1-academy"
        assert all(isinstance(v, float) and np.isfinite(v) for v in out.values[: len(molecules)])
        assert isinstance(out.values[-1], AdapterInputError) and out.values[-1].item == len(molecules)

    run_with_agent(pool, body)


def test_typed_errors_reach_the_caller_and_the_agent_stays_up(pool: Any) -> None:
    async def body(manager: Manager[Any], tpm: Handle[TPMAgent]) -> None:
        with pytest.raises(InvalidRequest, match="not installed"):
            await tpm.embed(["CCO"], adapter="no-such-adapter")
        with pytest.raises(InvalidRequest, match="no part"):
            await tpm.predict(["CCO"], adapter="smiles", head="solubility")
        with pytest.raises(InvalidRequest):
            await tpm.generate()  # neither a prompt nor prompt_embeds
        # Still running, and still answering.
        assert tpm.agent_id in manager.running()
        assert (await tpm.generate("still up", max_tokens=2)).usage["completion_tokens"] == 2

    run_with_agent(pool, body)


class _Gated(TPMAgent):
    """A TPMAgent whose pool client holds each ``generate`` until ``width`` calls are inside it at once."""

    def __init__(self, url: str, token: str, width: int) -> None:
        super().__init__(url, token)
        self.width = width
        self.inside = 0
        self.most_inside = 0

    async def agent_on_startup(self) -> None:
        await super().agent_on_startup()
        real = self.client.generate
        all_in = asyncio.Event()

        async def gated(*args: Any, **kwargs: Any) -> Any:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            if self.inside >= self.width:
                all_in.set()
            await all_in.wait()  # with actions run one at a time this would never be set
            try:
                return await real(*args, **kwargs)
            finally:
                self.inside -= 1

        self.client.generate = gated  # type: ignore[method-assign]


def test_concurrent_actions_run_concurrently(pool: Any) -> None:
    agent = _Gated(pool.url, pool.token, width=2)

    async def body(manager: Manager[Any], tpm: Handle[TPMAgent]) -> list[Any]:
        calls = [tpm.generate(f"together {i}", max_tokens=4, seed=i) for i in range(2)]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=60)

    out = run_with_agent(pool, body, agent=agent)
    assert [g.usage["completion_tokens"] for g in out] == [4, 4] and agent.most_inside == 2


class _Held(TPMAgent):
    """A TPMAgent whose ``generate`` calls the pool, then stays in flight until the test lets go:
    how long the call lasts is up to the test, not to how fast this machine generates."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(url, token)
        self.in_flight = threading.Event()
        self.release = threading.Event()

    async def agent_on_startup(self) -> None:
        await super().agent_on_startup()
        real = self.client.generate

        async def held(*args: Any, **kwargs: Any) -> Any:
            self.in_flight.set()
            answer = await real(*args, **kwargs)
            await asyncio.to_thread(self.release.wait, 60)  # awaiting, as a long pool call does
            return answer

        self.client.generate = held  # type: ignore[method-assign]


def test_agent_answers_while_a_long_call_is_in_flight(pool: Any) -> None:
    """An action in flight does not block the agent: a ping and another action come back first."""
    agent = _Held(pool.url, pool.token)

    async def body(manager: Manager[Any], tpm: Handle[TPMAgent]) -> None:
        long = asyncio.ensure_future(tpm.generate("long", max_tokens=32, seed=0, ignore_eos=True))
        assert await asyncio.to_thread(agent.in_flight.wait, 30), "the call never reached the agent"
        await tpm.ping(timeout=10)
        assert await tpm.models() == ["tiny-llama"]
        assert not long.done()  # both answers came while the call was still open
        agent.release.set()
        gen = await long
        assert gen.usage["completion_tokens"] == 32

    run_with_agent(pool, body, agent=agent)


class _Chemist(Agent):
    """Another agent that calls the pool through its handle to a TPMAgent."""

    def __init__(self, tpm: Handle[TPMAgent]) -> None:
        super().__init__()
        self.tpm = tpm

    @action
    async def propose(self, prefix: str, n: int) -> list[str]:
        gens = await asyncio.gather(*(self.tpm.generate(prefix, max_tokens=6, seed=s) for s in range(n)))
        return [prefix + g.text for g in gens]


def test_another_agent_calls_through_its_handle(pool: Any) -> None:
    async def body(manager: Manager[Any], tpm: Handle[TPMAgent]) -> None:
        chemist = await manager.launch(_Chemist, args=(tpm,))
        proposals = await chemist.propose("CC", 3)
        assert len(proposals) == 3 and all(p.startswith("CC") for p in proposals)
        await manager.shutdown(chemist, blocking=True, timeout=30)

    run_with_agent(pool, body)


def test_pool_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPMFLOW_URL", raising=False)
    monkeypatch.delenv("TPMFLOW_TOKEN", raising=False)
    with pytest.raises(ValueError, match="TPMFLOW_URL"):
        TPMAgent()
    monkeypatch.setenv("TPMFLOW_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("TPMFLOW_TOKEN", "t")
    agent = TPMAgent()
    assert (agent.url, agent.token) == ("http://127.0.0.1:1", "t")
