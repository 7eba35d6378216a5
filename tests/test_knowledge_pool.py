"""Knowledge collections through a real pool (issue 17): the pool embeds what a collection holds,
on the model version the collection was made with; an adapter's per-item errors come back per
item and the rest is added; searches find the items themselves first; the ledger meters the
embedding under knowledge/add and knowledge/search; another project sees nothing of a private
collection until it is shared; the CLI and the AsyncClient do the same."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tpmflow import AsyncClient, Client
from tpmflow.errors import CollectionNotFound, Forbidden, InvalidRequest

pytestmark = pytest.mark.engine
MOLECULES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "C1CC1", "CCCC"]


def _name() -> str:
    return "k-" + uuid.uuid4().hex[:8]


def test_a_smiles_collection_adds_searches_filters_and_meters(pool: Any) -> None:
    name = _name()
    with pool.client() as client:
        mols = client.knowledge(name)
        info = mols.create(adapter="smiles")
        assert info["embedder"]["adapter"] == "smiles" and info["embedder"]["dim"] > 0
        items = [*MOLECULES[:3], "C1CC(", *MOLECULES[3:]]  # one the adapter refuses
        added = mols.add(
            items, metadata=[{"n": i, "kind": "acid" if "O)O" in m else "other"} for i, m in enumerate(items)]
        )
        assert added.ids[3] is None and [e.item for e in added.errors] == [3], added.errors
        assert all(i is not None for n, i in enumerate(added.ids) if n != 3), "the rest is added"
        assert mols.info()["items"] == len(MOLECULES)
        hits = mols.search(MOLECULES, k=3)
        for molecule, row in zip(MOLECULES, hits, strict=True):
            assert row[0].item == molecule and row[0].score == pytest.approx(1.0, abs=1e-4), row
        (acids,) = mols.search(["CCO"], k=2, filter={"kind": "acid"})
        assert [h.item for h in acids] == ["CC(=O)O"]
        # Vectors are the pool's own pooled embeddings of the items.
        direct = client.embed(["CCO", "CCN"], adapter="smiles").numpy()
        cos = float(direct[0] @ direct[1] / np.linalg.norm(direct[0]) / np.linalg.norm(direct[1]))
        (row,) = mols.search(["CCO"], k=len(MOLECULES))
        assert next(h.score for h in row if h.item == "CCN") == pytest.approx(cos, abs=1e-4)
        assert mols.delete([added.ids[0]]) == 1  # type: ignore[list-item]
        assert "CCO" not in [h.item for h in mols.search(["CCO"], k=3)[0]]
        assert mols.get([added.ids[1]])[0].item == "c1ccccc1"  # type: ignore[union-attr]
    pool.ledger.flush()
    endpoints = {r.endpoint for r in pool.access.ledger_rows(principal="pool-admin")}
    assert {"knowledge/add", "knowledge/search"} <= endpoints, "the pool's embedding is metered"


def test_a_text_collection_and_another_projects_view(pool: Any) -> None:
    name = _name()
    other = pool.add_principal("k-" + uuid.uuid4().hex[:6], "elsewhere", {"generate", "embed"})
    with pool.client() as owner, pool.client(other) as stranger:
        docs = owner.knowledge(name)
        docs.create()  # text
        docs.add(["the pool embeds items", "replicas heartbeat to gateways", "allocations hold SUs"])
        # The tiny model knows no English: an item finds itself first, nothing more is claimed.
        assert docs.search(["replicas heartbeat to gateways"], k=1)[0][0].item == "replicas heartbeat to gateways"
        with pytest.raises(InvalidRequest, match="not text"):
            docs.add([{"smiles": "CCO"}])
        with pytest.raises(CollectionNotFound):
            stranger.knowledge(name).search(["x"], k=1)
        with pytest.raises(CollectionNotFound):
            stranger.knowledge(name).info()
        assert name not in [c["name"] for c in stranger.collections()]
        docs.share(projects=["elsewhere"])
        assert stranger.knowledge(name).search(["allocations hold SUs"], k=1)[0][0].item == "allocations hold SUs"
        with pytest.raises(Forbidden):
            stranger.knowledge(name).add(["mine now"])
        with pytest.raises(InvalidRequest, match="greater than or equal to 1 at \\('k',\\)"):
            docs.search(["x"], k=0)  # refused before anything is embedded
        with pytest.raises(CollectionNotFound):
            owner.knowledge(_name()).search(["x"], k=1)
        docs.drop()
        with pytest.raises(CollectionNotFound):
            docs.info()


def test_the_async_client_and_the_cli(pool: Any, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tpmflow.cli import app

    name = _name()

    async def main() -> list[str]:
        async with AsyncClient(pool.url, pool.token) as client:
            mols = client.knowledge(name)
            await mols.create(adapter="smiles")
            await mols.add(MOLECULES)
            return [h.item for h in (await mols.search(["c1ccccc1"], k=1))[0]]

    assert asyncio.run(main()) == ["c1ccccc1"]
    csv = tmp_path / "more.csv"
    csv.write_text("item,tpsa\nCCOC,9.2\nNCCO,46.3\nC1CC(,0\n")
    env = {"TPMFLOW_URL": pool.url, "TPMFLOW_TOKEN": pool.token}
    runner = CliRunner()
    out = runner.invoke(app, ["knowledge", "add", name, str(csv)], env=env)
    assert out.exit_code == 0 and "added 2, refused 1" in out.output, out.output
    out = runner.invoke(app, ["knowledge", "search", name, "NCCO", "--k", "1", "--filter", "tpsa=46.3"], env=env)
    assert out.exit_code == 0 and "NCCO" in out.output, out.output
    out = runner.invoke(app, ["knowledge", "list"], env=env)
    assert name in out.output and "smiles" in out.output
    out = runner.invoke(app, ["knowledge", "show", _name()], env=env)
    assert out.exit_code == 1 and "CollectionNotFound" in out.output
    with Client(pool.url, pool.token) as client:
        assert client.knowledge(name).info()["items"] == len(MOLECULES) + 2


def test_a_background_writer_batches_results_without_blocking_the_thinker(pool: Any) -> None:
    import threading

    name = _name()
    with pool.client() as client:
        client.knowledge(name).create(adapter="smiles")
        molecules = [("C" * (1 + i % 7)) + ("O" if i % 2 else "N") for i in range(50)] + ["C1CC("]
        pool_answers = threading.Event()  # the pool "is slow": no batch is added until the test says
        with client.knowledge(name).writer(batch=16, flush_s=0.5) as out:
            add = out.collection.add

            def slow_add(*args: Any, **kwargs: Any) -> Any:
                pool_answers.wait(120)
                return add(*args, **kwargs)

            out.collection.add = slow_add  # type: ignore[method-assign]
            for i, molecule in enumerate(molecules):
                out.put(molecule, {"step": i})
            assert out.added == [], "every put returned while the pool had answered nothing"
            pool_answers.set()
        assert len(out.added) == 50 and [e.item for e in out.errors] == [50], out.errors  # its place among all put
        info = client.knowledge(name).info()
        assert info["items"] == 50 and info["fields"] == ["step"]


def test_generate_retrieves_into_the_prompt_and_says_what_it_brought(pool: Any) -> None:
    """retrieve= on completions: the k nearest items as a Context: block before the prompt. The
    answer equals the greedy answer to the prompt written out by hand (so the model saw exactly
    that), and provenance names the collection, embedder, ids and scores a search gives."""
    import httpx

    from tpmflow.knowledge.context import text_context

    name = _name()
    notes = ["CCO is ethanol", "CCN is ethylamine", "c1ccccc1 is benzene", "CC(=O)O is acetic acid"]
    with pool.client() as client:
        docs = client.knowledge(name)
        docs.create()
        ids = docs.add(notes, metadata=[{"rank": i} for i in range(len(notes))]).ids
        prompt = "CCO is"
        (hits,) = docs.search([prompt], k=2)
        got = client.generate(prompt, max_tokens=8, temperature=0.0, retrieve={"collection": name, "k": 2})
        written = text_context([(h.item, h.metadata) for h in hits]) + prompt
        assert written.startswith("Context:\n- CCO is ethanol (rank=0)\n"), written
        by_hand = client.generate(written, max_tokens=8, temperature=0.0)
        assert got.text == by_hand.text and got.usage["prompt_tokens"] == by_hand.usage["prompt_tokens"]
        retrieved = got.provenance["retrieved"]
        assert retrieved["collection"] == name and retrieved["embedder"]["dim"] > 0
        assert retrieved["ids"] == [[h.id for h in hits]] and set(retrieved["ids"][0]) <= set(ids)
        assert retrieved["scores"][0] == pytest.approx([h.score for h in hits], abs=1e-5)
        # One query for a batch of prompts; a filter; the stream carries the same header.
        many = client.generate(
            ["a", "b"],
            max_tokens=2,
            temperature=0.0,
            retrieve={"collection": name, "k": 1, "query": ["CCN"], "filter": {"rank": 1}},
        )
        assert many[0].provenance["retrieved"]["ids"] == [[ids[1]], [ids[1]]]
        body = {
            "model": "tiny-llama",
            "prompt": prompt,
            "max_tokens": 2,
            "stream": True,
            "retrieve": {"collection": name, "k": 1},
        }
        with httpx.stream(
            "POST",
            f"{pool.url}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {pool.token}"},
            timeout=60,
        ) as resp:
            assert resp.status_code == 200 and "[DONE]" in resp.read().decode()
            assert '"collection":"' + name in resp.headers["X-Tpmflow-Retrieved"]
        # Bad retrieval: a typed error before any generation, and the pool still serves.
        with pytest.raises(CollectionNotFound):
            client.generate(prompt, max_tokens=1, retrieve={"collection": _name()})
        with pytest.raises(InvalidRequest, match="less than or equal to 16"):
            client.generate(prompt, max_tokens=1, retrieve={"collection": name, "k": 100})
        with pytest.raises(InvalidRequest, match="give 1 \\(for every prompt\\) or 2"):
            client.generate(["a", "b"], max_tokens=1, retrieve={"collection": name, "query": ["x", "y", "z"]})
        with pytest.raises(InvalidRequest, match="text prompts"):
            client.generate([[1, 2, 3]], max_tokens=1, retrieve={"collection": name})  # token ids
        generate_only = pool.add_principal("gen-" + uuid.uuid4().hex[:6], "pool", {"generate"})
        with pool.client(generate_only) as limited, pytest.raises(Forbidden, match="needs the embed permission"):
            limited.generate(prompt, max_tokens=1, retrieve={"collection": name})
        with pytest.raises(InvalidRequest, match="Extra inputs are not permitted at \\(.top.,\\)"):
            client.generate(prompt, max_tokens=1, retrieve={"collection": name, "top": 3})
        assert client.generate(prompt, max_tokens=1).text is not None
    pool.ledger.flush()
    rows = [r for r in pool.access.ledger_rows(principal="pool-admin") if r.correlation_id == got.request_id]
    assert sorted(r.endpoint for r in rows) == ["completions", "knowledge/retrieve"], "the search is metered too"


def test_adapter_generate_conditions_on_retrieved_molecules(pool: Any) -> None:
    """retrieve= on the adapters' generate route: the SMILES adapter writes the retrieved molecules
    and their properties before the prefix; the decoded text continues the prefix, not the context."""
    name = _name()
    with pool.client() as client:
        mols = client.knowledge(name)
        mols.create(adapter="smiles")
        ids = mols.add(MOLECULES, metadata=[{"score": 0.5 + i / 10} for i in range(len(MOLECULES))]).ids
        (hits,) = mols.search(["CCCC"], k=3)
        out = client.generate(
            ["CC", "C1CC(", "c1"],
            adapter="smiles",
            max_tokens=12,
            temperature=0.0,
            retrieve={"collection": name, "k": 3, "query": ["CCCC"]},
        )
        assert out.retrieved is not None and out.retrieved["ids"] == [[h.id for h in hits]] * 3
        assert set(out.retrieved["ids"][0]) <= set(ids)
        # What the SMILES adapter writes (tests/test_adapters_smiles.py checks it; RDKit is not
        # imported here: loaded after the engine's libraries it can crash this process).
        context = "".join(f"{h.item} score={h.metadata['score']:.4g}\n" for h in hits)
        assert context.splitlines()[0] == "CCCC score=1", context  # the query molecule itself, nearest
        for prefix, decoded in zip(["CC", "C1CC(", "c1"], out, strict=True):
            assert not isinstance(decoded, Exception)
            by_hand = client.generate(context + prefix, max_tokens=12, temperature=0.0)
            assert decoded[0].text == prefix + by_hand.text, (prefix, decoded, by_hand.text)
        # Without a query, the items are the queries: an empty prefix cannot be embedded.
        with pytest.raises(InvalidRequest, match="prompt 1 could not be embedded"):
            client.generate(["CC", ""], adapter="smiles", max_tokens=2, retrieve={"collection": name, "k": 1})


def test_a_thinker_remembers_results_as_they_arrive(pool: Any, tmp_path: Path) -> None:
    """A Colmena result stream into a collection: the result processor records each Result without
    waiting (a Writer per collection batches the embed calls); what the pool refuses is reported;
    everything is in when the thinker ends. A run folder's CSV and ProxyStore proxies go in the same way."""
    from colmena.models.results import Result
    from colmena.thinker import agent, result_processor
    from proxystore.connectors.file import FileConnector
    from proxystore.store import Store

    from tpmflow.colmena import SafePipeQueues, TPMThinker
    from tpmflow.knowledge.sources import csv_rows, ingest, resolved

    name = _name()
    with pool.client() as client:
        client.knowledge(name).create(adapter="smiles")

    class Recorder(TPMThinker):
        @agent
        def simulate(self) -> None:
            for smiles in [*MOLECULES[:4], "C1CC("]:
                self.submit_tpm("embed", [smiles], adapter="smiles", task_info={"smiles": smiles})

        @result_processor(topic="tpm")
        def receive(self, result: Result) -> None:
            self.remember_result(
                name,
                result,
                item=lambda r: r.task_info["smiles"],
                metadata=lambda r: {"ok": r.success, "method": r.method},
            )

    thinker = Recorder(
        SafePipeQueues(topics=["tpm"]), url=pool.url, token=pool.token, memory_batch=2, memory_flush_s=0.2
    )
    # A result made elsewhere (a simulation's), recorded with the default item and metadata.
    done = Result(inputs=(("CCCC",), {}), method="simulate", topic="sim")
    done.set_result(0.25, runtime=1.0)
    thinker.remember_result(name, done)
    thinker.start()
    thinker.join(timeout=120)
    assert not thinker.is_alive()
    (refused,) = thinker.memory_errors()[name]  # C1CC(: its place among the 6 put depends on arrival order
    assert "RDKit" in str(refused) and 1 <= refused.item <= 5, refused
    csv = tmp_path / "simulations.csv"
    csv.write_text("smiles,energy\nCCOC,-1.5\nNCCO,2\n")
    with Store("knowledge-test", FileConnector(str(tmp_path / "ps"))) as store, pool.client() as client:
        with client.knowledge(name).writer(batch=8) as out:
            assert ingest(out, csv_rows(csv, item_column="smiles")) == 2
            assert ingest(out, resolved([(store.proxy("C1CC1C"), {"via": "proxy"})])) == 1
        mols = client.knowledge(name)
        assert mols.info()["items"] == 4 + 1 + 2 + 1
        (hit,) = mols.search(["CCCC"], k=1)[0]
        assert hit.metadata == {
            "method": "simulate",
            "topic": "sim",
            "task_id": done.task_id,
            "source": "colmena",
            "value": 0.25,
        }
        (hit,) = mols.search(["CCO"], k=1)[0]
        assert hit.item == "CCO" and hit.metadata == {"ok": True, "method": "tpm.embed"}
        (hit,) = mols.search(["CCOC"], k=1)[0]
        assert hit.metadata == {"source": str(csv), "energy": -1.5}
        assert mols.search(["C1CC1C"], k=1)[0][0].metadata == {"via": "proxy"}
    with pytest.raises(ValueError, match="no 'item' column"):
        next(csv_rows(csv))


def test_the_adapter_version_is_part_of_the_embedder(pool: Any) -> None:
    """The first add pins the adapter version the pool served (with the adapter's config); when the
    pool's adapter changes, adds and searches are refused until the collection is re-embedded, which
    works for the version the collection already has."""
    from sqlalchemy import update

    from tpmflow.knowledge.tables import CollectionRow

    name = _name()
    with pool.client() as client:
        mols = client.knowledge(name)
        created = mols.create(adapter="smiles", config={"max_heavy_atoms": 60})
        assert created["embedder"]["adapter_version"] is None and created["embedder"]["config"] == {
            "max_heavy_atoms": 60
        }
        mols.add(MOLECULES[:3])
        embedder = mols.info()["embedder"]
        assert embedder["adapter_version"] == "smiles@0.1.0", embedder
        assert mols.add(["C" * 70]).errors[0].item == 0, "the collection's adapter config is used (60 heavy atoms)"
        older = {**embedder, "adapter_version": "smiles@0.0.9"}  # as if the pool's adapter were upgraded since
        with pool.access.engine.begin() as conn:
            conn.execute(update(CollectionRow).where(CollectionRow.name == name).values(embedder=json.dumps(older)))
        with pytest.raises(InvalidRequest, match="embedded by adapter smiles@0.0.9; the pool now serves smiles@0.1.0"):
            mols.add(["CCN"])
        with pytest.raises(InvalidRequest, match="smiles@0.0.9"):
            mols.search(["CCN"], k=1)
        done = mols.reembed(embedder["model"][:20])
        assert done["complete"] and mols.info()["embedder"]["adapter_version"] == "smiles@0.1.0"
        assert mols.add(["CCN"]).ids[0] is not None and mols.search(["CCN"], k=1)[0][0].item == "CCN"
        with pytest.raises(InvalidRequest, match="config is the adapter's"):
            client.knowledge(_name()).create(config={"part": "x"})
