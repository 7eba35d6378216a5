"""The adapter plug point and the SMILES adapter, found through its entry point like any package."""

from __future__ import annotations

import numpy as np
import pytest

from tpmflow.adapters import (
    Adapter,
    AdapterFit,
    EncodedText,
    ItemError,
    available_adapters,
    check_fits,
    load_adapter,
)
from tpmflow.errors import InvalidRequest


@pytest.fixture(scope="module")
def smiles() -> Adapter:
    return load_adapter("smiles")


def test_found_through_its_entry_point(smiles: Adapter) -> None:
    assert "smiles" in available_adapters()
    assert isinstance(smiles, Adapter)
    assert (smiles.name, smiles.modality) == ("smiles", "molecule")


def test_missing_adapter_names_what_is_installed() -> None:
    with pytest.raises(InvalidRequest, match="not installed.*smiles"):
        load_adapter("pointcloud-from-mars")


def test_mixed_batch_reports_each_bad_item_and_keeps_the_rest(smiles: Adapter) -> None:
    items = ["OCC", "", "C1CC", "C" * 200, "C" * 5000, 42, "InChI=1S/C2H6O/c1-2-3/h3H,2H2,1H3", "c1ccccc1"]
    out = smiles.encode(items)
    assert len(out) == len(items)
    good = {i: o.text for i, o in enumerate(out) if isinstance(o, EncodedText)}
    bad = {o.item: o.reason for o in out if isinstance(o, ItemError)}
    assert good == {0: "CCO", 6: "CCO", 7: "c1ccccc1"}  # canonical; InChI in
    assert bad[1] == "empty string"
    assert "parse" in bad[2]
    assert "heavy atoms" in bad[3]
    assert "characters" in bad[4]
    assert "string" in bad[5]


def test_encode_is_deterministic_and_canonical(smiles: Adapter) -> None:
    items = ["C(C)O", "OCC", "c1ccccc1O", "Oc1ccccc1"]
    first, second = smiles.encode(items), smiles.encode(items)
    assert first == second
    assert [o.text for o in first] == ["CCO", "CCO", "Oc1ccccc1", "Oc1ccccc1"]


def test_template_and_config_round_trip() -> None:
    adapter = load_adapter("smiles", {"template": "Molecule: {smiles}\n", "max_heavy_atoms": 10})
    assert adapter.encode(["OCC"])[0] == EncodedText("Molecule: CCO\n")
    assert isinstance(adapter.encode(["C" * 11])[0], ItemError)
    assert load_adapter("smiles", adapter.config()).config() == adapter.config()
    with pytest.raises(ValueError):
        load_adapter("smiles", {"template": "no placeholder"})


def test_morgan_fingerprints(smiles: Adapter) -> None:
    fps, errors = smiles.fingerprints(["CCO", "not a molecule", "c1ccccc1"])
    assert fps.shape == (3, 2048) and fps.dtype == np.float32
    assert fps[0].sum() > 0 and fps[1].sum() == 0 and fps[2].sum() > 0
    assert [e.item for e in errors] == [1]
    again, _ = smiles.fingerprints(["CCO"])
    np.testing.assert_array_equal(again[0], fps[0])


def test_decode_gives_valid_unique_canonical_molecules_with_reasons(smiles: Adapter) -> None:
    out = smiles.decode(["CCO", "OCC", "C1CC", "", "c1ccccc1"])
    assert [d.value for d in out] == ["CCO", None, None, None, "c1ccccc1"]
    assert out[1].reason == "duplicate of output 0"
    assert "parse" in out[2].reason and out[3].reason == "empty string"
    assert out[0].ok and not out[1].ok


def test_retrieved_molecules_are_written_one_a_line_with_their_properties(smiles: Adapter) -> None:
    """The context retrieve= puts before a generation prefix: canonical SMILES and scalar properties;
    what does not parse is left out, nested metadata is not dumped into the prompt."""
    entries = [("OCC", {"score": 0.71234, "tags": ["a"]}), ("C1CC(", {}), ("c1ccccc1", {"name": "benzene", "n": 6})]
    assert smiles.retrieval_context(entries) == "CCO score=0.7123\nc1ccccc1 n=6 name=benzene\n"  # type: ignore[attr-defined]
    assert smiles.retrieval_context([]) == ""  # type: ignore[attr-defined]


def test_adapters_built_for_another_model_are_refused(smiles: Adapter) -> None:
    check_fits(smiles, hidden_size=128, content_hash="blake3:abc")  # the text route fits any model

    class Trained:
        name, version, modality = "head", "1", "molecule"
        fit = AdapterFit(hidden_size=4096, content_hashes=("blake3:" + "a" * 64,))

    with pytest.raises(InvalidRequest, match="hidden size 4096"):
        check_fits(Trained(), hidden_size=128, content_hash="blake3:" + "a" * 64)  # type: ignore[arg-type]
    Trained.fit = AdapterFit(hidden_size=128, content_hashes=("blake3:" + "a" * 64,))
    with pytest.raises(InvalidRequest, match="another model"):
        check_fits(Trained(), hidden_size=128, content_hash="blake3:" + "b" * 64)  # type: ignore[arg-type]


def test_pool_embeds_domain_items_through_the_adapter(client: object) -> None:
    """Through a real pool: bad items get their own error, the valid ones still complete."""
    from tpmflow.client import Client
    from tpmflow.errors import AdapterInputError

    assert isinstance(client, Client)
    emb = client.embed(["CCO", "", "C1CC", "OCC", "C" * 200], adapter="smiles")
    assert emb.ok == [0, 3]
    assert [e.item for e in emb.errors] == [1, 2, 4]
    assert "empty" in emb.errors[0].message and "heavy atoms" in emb.errors[2].message
    with pytest.raises(AdapterInputError):
        emb.numpy()
    vectors = emb.numpy(only_ok=True)
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-6)  # OCC canonicalises to CCO
    np.testing.assert_allclose(vectors[0], client.embed("CCO").numpy()[0], rtol=1e-5)
    assert emb.provenance["sampling"]["adapter"] == "smiles@0.1.0"
    with pytest.raises(InvalidRequest, match="not installed"):
        client.embed(["CCO"], adapter="no-such-adapter")
    with pytest.raises(InvalidRequest, match="bad config"):
        client.embed(["CCO"], adapter="smiles", adapter_config={"template": "no placeholder"})
    assert client.generate("still up", max_tokens=2).usage["completion_tokens"] == 2


def test_predict_with_a_head_fitted_on_pool_embeddings(pool: object, client: object, monkeypatch) -> None:
    """Fit a small TPSA head on the tiny pool's embeddings, serve it by name@version, refuse misuse."""
    import json
    from pathlib import Path

    from tpmflow_smiles.tpsa import fit_tpsa_head, tpsa_labels

    from tpmflow.errors import AdapterInputError
    from tpmflow.models.smiles_data import load_split

    monkeypatch.setenv("TPMFLOW_PARTS", pool.cfg.parts_path)  # where the replicas look
    split = load_split()
    path, card = fit_tpsa_head(client, split.train[:160], split.heldout[:40], version="0.0.1-test")
    assert card.base_content_hash.startswith("blake3:") and card.hidden_size == 128
    assert {"heldout_r2_core_embeddings", "heldout_r2_fingerprints_alone", "heldout_r2_random_projector"} <= set(
        card.metrics
    )
    assert (path / "weights.safetensors").is_file()
    from tpmflow.adapters.testing import check_part_folder

    check_part_folder(path)

    labels = tpsa_labels()
    molecules = [s for s in split.heldout[:5] if s in labels]
    out = client.predict([*molecules, "not a molecule"], adapter="smiles", head="tpsa@0.0.1-test")
    assert out.ok == list(range(len(molecules)))
    assert isinstance(out.values[-1], AdapterInputError) and out.values[-1].item == len(molecules)
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values[:-1])
    assert out.head["version"] == "0.0.1-test"

    # A head trained on another core model is refused, as is one that does not exist.
    other = Path(pool.cfg.parts_path) / "smiles" / "tpsa@0.0.2-other"
    other.mkdir(parents=True)
    (other / "weights.safetensors").write_bytes((path / "weights.safetensors").read_bytes())
    (other / "card.json").write_text(
        json.dumps({**card.model_dump(), "version": "0.0.2-other", "base_content_hash": "blake3:" + "0" * 64})
    )
    with pytest.raises(InvalidRequest, match="trained on"):
        client.predict(molecules, adapter="smiles", head="tpsa@0.0.2-other")
    with pytest.raises(InvalidRequest, match="no part"):
        client.predict(molecules, adapter="smiles", head="solubility")
    with pytest.raises(InvalidRequest, match="bad part name"):
        client.predict(molecules, adapter="smiles", head="../../etc/passwd")


def test_generate_from_domain_prompts_decodes_each_output(client: object) -> None:
    from tpmflow.adapters import Decoded
    from tpmflow.errors import AdapterInputError

    items = ["", "c1ccccc1", "CC^&", "two words"]
    out = client.generate(items, adapter="smiles", n=3, max_tokens=12, temperature=1.0, seed=5)
    assert len(out) == 4
    for i in (0, 1):
        assert len(out[i]) == 3 and all(isinstance(d, Decoded) for d in out[i])
        assert all((d.value is None) == (d.reason is not None) for d in out[i])  # a value or a reason
    assert out[1][0].text.startswith("c1ccccc1")  # completions continue the prefix
    assert isinstance(out[2], AdapterInputError) and "^" in out[2].message and out[2].item == 2
    assert isinstance(out[3], AdapterInputError) and out[3].item == 3
    again = client.generate(items[:2], adapter="smiles", n=3, max_tokens=12, temperature=1.0, seed=5)
    assert [[d.text for d in o] for o in again] == [[d.text for d in o] for o in out[:2]]


def test_smiles_adapter_passes_the_conformance_kit(smiles: Adapter) -> None:
    from tpmflow.adapters.testing import check_adapter

    check_adapter(smiles, good=["CCO", "c1ccccc1O", "InChI=1S/CH4/h1H4"], bad=["", "C1CC", "C" * 400, 7])


def test_conformance_kit_catches_a_broken_adapter() -> None:
    from tpmflow.adapters.testing import check_adapter

    class Sloppy:
        """Drops bad items instead of reporting them: the batch shifts under the caller."""

        name, version, modality = "sloppy", "0", "text"
        fit = AdapterFit()

        def encode(self, items):
            return [EncodedText(x) for x in items if isinstance(x, str) and x]

        def decode(self, texts):
            return []

        def config(self):
            return {}

    with pytest.raises(AssertionError, match="one result per item"):
        check_adapter(Sloppy(), good=["a"], bad=[""])
