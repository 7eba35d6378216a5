"""Soft-token adapters served by the pool: point clouds and detector frames in, per-item results
or errors out; parts trained against transformers serve the same states in vLLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tpmflow.errors import AdapterInputError, InvalidRequest


def _save_untrained(client: Any, adapter: Any, model: Any, name: str) -> str:
    """An untrained encoder + projector saved as a part for the pool's model (enough to check the
    serving path); its ``name@version``."""
    from tpmflow.adapters.training import save_projector

    prov = client.embed(["a"]).provenance
    return save_projector(
        adapter,
        model,
        name,
        "0.0.1-test",
        base_model=prov["model"],
        base_content_hash=prov["content_hash"],
        hidden_size=128,
        training_data={"untrained": "test"},
        metrics={},
    )


@pytest.fixture(scope="module")
def parts(pool: Any, monkeypatch_module: Any) -> Path:
    monkeypatch_module.setenv("TPMFLOW_PARTS", pool.cfg.parts_path)  # where the replicas look
    return Path(pool.cfg.parts_path)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def shapes_report(client: Any, parts: Path, tiny_model_dir: Path) -> Any:
    """The whole fit on a small scale: train through transformers, serve, score with predict."""
    from tpmflow_pointcloud.fit import quality_check

    return quality_check(client, tiny_model_dir, version="0.0.1-test", n_train=120, n_heldout=60, steps=60)


def test_fit_reports_the_head_and_both_baselines(shapes_report: Any, parts: Path) -> None:
    r = shapes_report
    print(
        f"\nshapes on the tiny core: core {r.core:.3f}, encoder alone {r.encoder_alone:.3f}, random {r.random_projector:.3f}"
    )
    assert r.metric == "accuracy" and (r.n_train, r.n_heldout) == (120, 60)
    for value in (r.core, r.encoder_alone, r.random_projector):
        assert 0.0 <= value <= 1.0
    assert r.encoder_alone > 1 / 6 + 0.15, "the trained encoder learned nothing about the shapes"
    card = json.loads((parts / "pointcloud" / "shape@0.0.1-test" / "card.json").read_text())
    assert card["kind"] == "softmax-classifier" and card["settings"] == {"part": r.projector}
    assert {"heldout_accuracy", "heldout_accuracy_encoder_alone", "heldout_accuracy_random_projector"} <= set(
        card["metrics"]
    )
    from tpmflow.adapters.testing import check_part_folder

    check_part_folder(parts / "pointcloud" / "shape@0.0.1-test")
    check_part_folder(parts / "pointcloud" / r.projector)


def test_served_soft_tokens_match_the_transformers_copy(client: Any, shapes_report: Any, tiny_model_dir: Path) -> None:
    from tpmflow_pointcloud.synthetic import make_shapes

    from tpmflow.adapters import load_adapter
    from tpmflow.adapters.training import FrozenCore

    clouds, _, _ = make_shapes(4, seed=7)
    served = client.embed(clouds, adapter="pointcloud", adapter_config={"part": shapes_report.projector})
    adapter = load_adapter("pointcloud", {"part": shapes_report.projector})
    soft = torch.from_numpy(adapter.soft_tokens(np.stack(adapter.prepare(clouds))))
    with torch.no_grad():
        expected = FrozenCore.load(tiny_model_dir).pooled(soft).numpy()
    np.testing.assert_allclose(served.numpy(), expected, atol=2e-3, rtol=1e-3)


def test_bad_clouds_get_item_errors_and_the_rest_complete(client: Any, shapes_report: Any) -> None:
    from tpmflow_pointcloud.synthetic import make_shapes, to_ply_bytes

    clouds, _, _ = make_shapes(2, seed=3)
    nan = clouds[0].copy()
    nan[3, 1] = np.nan
    ply = to_ply_bytes(clouds[1])
    items = [
        clouds[0],
        nan,
        np.zeros((0, 3), np.float32),
        np.ones((100, 2), np.float32),
        "/etc/passwd",
        ply[: len(ply) // 2],  # truncated binary PLY
        ply,  # a good file, by reference through the store and the sandbox
        clouds[1],
    ]
    out = client.predict(items, adapter="pointcloud", head="shape@0.0.1-test")
    assert out.ok == [0, 6, 7]
    reasons = {e.item: str(e) for e in out.errors}
    assert "NaN" in reasons[1] or "finite" in reasons[1]
    assert "never opened" in reasons[4]
    assert set(reasons) == {1, 2, 3, 4, 5}
    assert out.values[6] == out.values[7], "a file and the array it holds give the same answer"
    assert abs(sum(out.probabilities[0].values()) - 1) < 1e-5


def test_a_forged_reference_is_that_item_s_error(client: Any, shapes_report: Any) -> None:
    from tpmflow_pointcloud.synthetic import make_shapes, to_npy_bytes

    clouds, _, _ = make_shapes(1, seed=4)
    ref = client.put(to_npy_bytes(clouds[0]))
    forged = ref.model_copy(update={"nbytes": ref.nbytes + 1})
    out = client.embed([ref, forged], adapter="pointcloud", adapter_config={"part": shapes_report.projector})
    assert out.ok == [0]
    assert isinstance(out.items[1], AdapterInputError) and "forged" in str(out.items[1])


def test_a_part_trained_for_another_model_is_refused(client: Any, shapes_report: Any, parts: Path) -> None:
    src = parts / "pointcloud" / shapes_report.projector
    other = parts / "pointcloud" / "other-model@0.0.2"
    other.mkdir(parents=True, exist_ok=True)
    (other / "weights.safetensors").write_bytes((src / "weights.safetensors").read_bytes())
    card = json.loads((src / "card.json").read_text())
    (other / "card.json").write_text(
        json.dumps({**card, "name": "other-model", "version": "0.0.2", "base_content_hash": "blake3:0"})
    )
    with pytest.raises(InvalidRequest, match="trained against another model"):
        client.embed([np.ones((64, 3))], adapter="pointcloud", adapter_config={"part": "other-model@0.0.2"})
    with pytest.raises(InvalidRequest, match="needs a trained projector"):
        client.embed([np.ones((64, 3))], adapter="pointcloud")
    with pytest.raises(InvalidRequest, match="carries its own settings"):
        client.embed([np.ones((64, 3))], adapter="pointcloud", adapter_config={"part": "shapes", "groups": 4})


def test_parts_are_immutable_resolved_to_a_version_and_matched_to_their_head(
    client: Any, shapes_report: Any, parts: Path
) -> None:
    from tpmflow.adapters.parts import PartCard, save_part

    name = shapes_report.projector.split("@")[0]
    out = client.embed([np.ones((64, 3))], adapter="pointcloud", adapter_config={"part": name})  # newest version
    assert out.provenance["sampling"]["config"]["part"] == shapes_report.projector
    card = json.loads((parts / "pointcloud" / shapes_report.projector / "card.json").read_text())
    with pytest.raises(FileExistsError, match="choose a new version"):
        save_part({}, PartCard.model_validate(card))
    random_projector = shapes_report.projector.replace(name, f"{name}-random")
    with pytest.raises(InvalidRequest, match="fitted on projector"):
        client.predict(
            [np.ones((64, 3))], adapter="pointcloud", head="shape@0.0.1-test", adapter_config={"part": random_projector}
        )


def test_detector_frames_as_nexus_files_and_eiger_bundles(client: Any, parts: Path, tiny_model_dir: Path) -> None:
    """Untrained (random) beamline parts are enough to check the serving path and its refusals."""
    from tpmflow_beamline.adapter import BeamlineAdapter
    from tpmflow_beamline.synthetic import eiger_bundle, make_dataset, nexus_bytes

    adapter = BeamlineAdapter()
    spec = _save_untrained(client, adapter, adapter.new_model(128, seed=0), "random")
    frames, _ = make_dataset(2, seed=0, size=128)
    good_file, bundle = nexus_bytes([frames[0]]), eiger_bundle([frames[0]])
    items = [
        good_file,
        b"\x89HDF\r\n\x1a\n" + b"\x00" * 100,  # an HDF5 signature and nothing behind it
        {"data": good_file, "path": "/entry/nothing/here", "frame": 0},
        bundle,
        "/etc/hostname",
        {"data": good_file, "path": None, "frame": 5},
        frames[1],
    ]
    out = client.embed(items, adapter="beamline", adapter_config={"part": spec})
    assert out.ok == [0, 3, 6]
    np.testing.assert_allclose(out[0], out[3], atol=1e-5)  # a single file and a bundle hold the same frame
    assert {e.item for e in out.errors} == {1, 2, 4, 5}


def test_smiles_fingerprint_soft_tokens_conform_and_generate_molecules(client: Any, parts: Path) -> None:
    """The molecule soft-token route: fingerprint -> encoder -> projector -> prompt_embeds; the
    generated text is decoded like the text route's (each output a molecule or a reason)."""
    from tpmflow_smiles.fingerprint import SmilesFingerprintAdapter

    from tpmflow.adapters import Decoded
    from tpmflow.adapters.testing import check_adapter

    adapter = SmilesFingerprintAdapter()
    adapter.use_model(adapter.new_model(128, seed=0))
    check_adapter(adapter, good=["CCO", "c1ccccc1O"], bad=["", "C1CC", 7], hidden_size=128)
    spec = _save_untrained(client, adapter, adapter.model, "fp-random")
    out = client.generate(
        ["CCO", "not a molecule", "c1ccccc1"],
        adapter="smiles-fp",
        adapter_config={"part": spec},
        n=2,
        max_tokens=8,
        temperature=1.0,
        seed=1,
    )
    assert isinstance(out[1], AdapterInputError) and out[1].item == 1
    for item in (out[0], out[2]):
        assert len(item) == 2 and all(isinstance(d, Decoded) and (d.ok or d.reason) for d in item)
