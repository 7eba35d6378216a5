"""A newcomer's soft-token adapter (examples/external_adapter_soft: protein sequences), used the way
docs/adapters.md tells its author to: pip-installed into this venv, checked before training, trained
on the tiny model, checked after, listed, versioned with `tpmflow adapters commit`, served by the
session's real pool (whose replicas find the new package through its entry point) and embedded
through it. The pool's own ``parts_path`` is the one parts folder throughout."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tpmflow.errors import AdapterInputError, InvalidRequest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "external_adapter_soft"
GOOD = ["MKTAYIAKQRQISFVKSHFSRQ", "acdefghiklmnpqrstvwy", "W"]
BAD = ["", "MKXB", "A" * 65, 3]  # empty, not amino acids, too long, not a string
HIDDEN = 128  # the tiny model's


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=timeout)


def _env_without_parts(**extra: str) -> dict[str, str]:
    """This process's environment without ``$TPMFLOW_PARTS``: the commands must find the pool's
    parts folder from ``--config`` alone. Wide, so rich does not wrap the tables."""
    env = {k: v for k, v in os.environ.items() if k != "TPMFLOW_PARTS"}
    return {**env, "COLUMNS": "220", **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``pip install`` the example into this venv, as its author would (from a copy, so the build
    leaves the repository clean); uninstalled afterwards unless it was installed before. Installed
    into site-packages, it is found by running replicas too: entry points and imports are re-read
    when a folder on sys.path changes."""
    had = _run(sys.executable, "-m", "pip", "show", "--quiet", "tpmflow-protein").returncode == 0
    copy = tmp_path_factory.mktemp("author") / "external_adapter_soft"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--force-reinstall"]
    proc = _run(*pip, str(copy))
    assert proc.returncode == 0, proc.stderr[-2000:]
    importlib.invalidate_caches()
    yield
    if not had:
        _run(sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", "tpmflow-protein")


# -- before training: no pool needed ----------------------------------------------------------------


def test_an_untrained_soft_adapter_is_checked_before_training(installed: None) -> None:
    from tpmflow.adapters import available_adapters, load_adapter
    from tpmflow.adapters.testing import check_adapter

    assert "protein" in available_adapters(), available_adapters()
    adapter = load_adapter("protein")
    with pytest.raises(InvalidRequest, match="needs a trained projector"):
        adapter.encode(GOOD)  # what the pool says to an untrained one, and what the kit used to raise
    check_adapter(adapter, GOOD, BAD, hidden_size=HIDDEN)
    check_adapter(adapter, GOOD, BAD)  # any width checks the shapes before the core is chosen
    assert adapter.model is None, "the kit checks a copy; the adapter stays untrained"


def test_the_kit_catches_soft_adapter_mistakes(installed: None) -> None:
    from tpmflow_protein import ProteinAdapter

    from tpmflow.adapters import ItemError
    from tpmflow.adapters.testing import check_adapter

    class RaisesOnBadItems(ProteinAdapter):
        def prepare(self, items: Any) -> Any:
            if any(not isinstance(x, str) for x in items):
                raise TypeError("not a string")
            return super().prepare(items)

    class WrongWidth(ProteinAdapter):
        encoder_dim = 16  # but the encoder below gives 32 features per token

        def build_encoder(self) -> Any:
            from tpmflow_protein.encoder import SequenceEncoder

            return SequenceEncoder(21, 32, 8)

    class WrongIndex(ProteinAdapter):
        def prepare(self, items: Any) -> Any:
            return [ItemError(0, p.reason) if isinstance(p, ItemError) else p for p in super().prepare(items)]

    with pytest.raises(AssertionError, match="prepare raised TypeError"):
        check_adapter(RaisesOnBadItems(), GOOD, BAD)
    with pytest.raises(AssertionError, match="encoder_dim=16"):
        check_adapter(WrongWidth(), GOOD, BAD)
    with pytest.raises(AssertionError, match="was not refused"):
        check_adapter(WrongIndex(), GOOD, BAD)


def test_item_errors_name_their_item_like_the_callers_error() -> None:
    from tpmflow.adapters import ItemError

    err = ItemError(3, "bad")
    assert err.item == 3 == AdapterInputError("bad", item=3).item
    with pytest.warns(DeprecationWarning, match="ItemError.item"):
        assert err.index == 3


def test_adapters_list_shows_metrics_from_the_pool_s_parts_folder(tmp_path: Path) -> None:
    """`tpmflow adapters list --config` reads the config's parts_path (not $TPMFLOW_PARTS) and shows
    every numeric metric a part was saved with (it showed {} unless they were held-out floats)."""
    from tpmflow.adapters.parts import PartCard, save_part

    card = PartCard(
        adapter="protein",
        name="hand-made",
        version="0.0.1",
        kind="ridge-regression",
        modality="protein-sequence",
        base_model="tiny-llama",
        base_content_hash="blake3:0",
        hidden_size=4,
        metrics={"train_loss": 0.25, "heldout_mae": 0.5, "n_heldout": 7, "note": "text is not shown"},
    )
    save_part({"weight": np.zeros(4, np.float32)}, card, root=tmp_path / "pool-parts")
    config = tmp_path / "pool.yaml"
    config.write_text(f"model: tiny-llama\nparts_path: {tmp_path / 'pool-parts'}\n")
    env = _env_without_parts(TPMFLOW_PARTS=str(tmp_path / "elsewhere"))
    proc = _run(sys.executable, "-m", "tpmflow.cli", "adapters", "list", "--config", str(config), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hand-made@0.0.1" in proc.stdout and str(tmp_path / "pool-parts") in proc.stdout.replace("\n", "")
    assert "heldout_mae=0.5, n_heldout=7, train_loss=0.25" in proc.stdout, proc.stdout
    plain = _run(sys.executable, "-m", "tpmflow.cli", "adapters", "list", env=env)
    assert "no trained parts yet" in plain.stdout, plain.stdout


# -- train, version, serve: the session's pool -------------------------------------------------------


@pytest.fixture(scope="module")
def pool_yaml(pool: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session pool's model and parts folder as the author's pool config names them."""
    path = tmp_path_factory.mktemp("author-config") / "pool.yaml"
    path.write_text(f"model: {pool.cfg.model}\nserved_model_name: tiny-llama\nparts_path: {pool.cfg.parts_path}\n")
    return path


@pytest.fixture(scope="module")
def trained(installed: None, pool: Any, pool_yaml: Path) -> str:
    """`python -m tpmflow_protein.train --config pool.yaml`: a small part, saved where the pool reads."""
    proc = _run(
        sys.executable,
        *("-m", "tpmflow_protein.train", "--config", str(pool_yaml)),
        *("--version", "0.0.1-test", "--steps", "30", "--n-train", "64"),
        env=_env_without_parts(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = proc.stdout.strip().splitlines()[-1]
    assert spec == "hydropathy@0.0.1-test"
    assert (Path(pool.cfg.parts_path) / "protein" / spec / "card.json").is_file()
    return spec


def test_the_trained_part_is_checked_listed_and_versioned(
    trained: str, pool: Any, pool_yaml: Path, tmp_path: Path
) -> None:
    from tpmflow.adapters import load_adapter
    from tpmflow.adapters.parts import part_path, pool_parts_dir, use_parts_dir
    from tpmflow.adapters.testing import check_adapter, check_part_folder

    assert pool_parts_dir(pool) == pool_parts_dir(pool_yaml) == Path(pool.cfg.parts_path)
    with use_parts_dir(pool_parts_dir(pool)):
        adapter = load_adapter("protein", {"part": trained})
        check_adapter(adapter, GOOD, BAD, hidden_size=HIDDEN)
        check_part_folder(part_path("protein", trained))
    with pytest.raises(AssertionError, match="hidden size 128"):
        check_adapter(adapter, GOOD, BAD, hidden_size=64)

    env = _env_without_parts()
    listing = _run(sys.executable, "-m", "tpmflow.cli", "adapters", "list", "--config", str(pool_yaml), env=env)
    assert listing.returncode == 0 and trained in listing.stdout and "train_loss=" in listing.stdout, listing.stdout

    store = tmp_path / "store"
    commit = _run(
        sys.executable,
        *("-m", "tpmflow.cli", "adapters", "commit", "protein", trained),
        *("--store", str(store), "--config", str(pool_yaml)),
        env=env,
    )
    assert commit.returncode == 0, commit.stderr[-2000:]
    elsewhere = tmp_path / "another-machine"
    restore = _run(
        sys.executable,
        *("-m", "tpmflow.cli", "adapters", "restore", "protein", trained, "--store", str(store)),
        env={**env, "TPMFLOW_PARTS": str(elsewhere)},
    )
    assert restore.returncode == 0, restore.stderr[-2000:]
    for name in ("card.json", "weights.safetensors"):
        served = Path(pool.cfg.parts_path) / "protein" / trained / name
        assert (elsewhere / "protein" / trained / name).read_bytes() == served.read_bytes()


def test_the_pool_serves_the_new_adapter_and_agrees_with_it_run_here(client: Any, pool: Any, trained: str) -> None:
    from tpmflow.adapters import load_adapter
    from tpmflow.adapters.parts import pool_parts_dir, use_parts_dir

    out = client.embed([*GOOD, *BAD], adapter="protein", adapter_config={"part": trained})
    assert out.ok == [0, 1, 2]  # the bad items do not fail the call: each holds its error
    assert [e.item for e in out.errors] == [3, 4, 5, 6] and all(isinstance(e, AdapterInputError) for e in out.errors)
    assert "empty" in out.errors[0].message and "amino acids" in out.errors[1].message
    served = out.numpy(only_ok=True)
    assert served.shape == (3, HIDDEN)
    assert out.provenance["sampling"]["config"]["part"] == trained
    with pytest.raises(AdapterInputError):
        out.numpy()  # asking for every row raises the first item's error

    # The first local comparison: the same part loaded here, its soft tokens sent by the client.
    with use_parts_dir(pool_parts_dir(pool)):
        here = load_adapter("protein", {"part": trained})
    local = client.embed(GOOD, adapter=here)
    np.testing.assert_allclose(local.numpy(), served, atol=1e-4)

    with pytest.raises(InvalidRequest, match="parts_path"):  # a missing part says where parts are looked for
        client.embed(GOOD, adapter="protein", adapter_config={"part": "never-saved@0.0.1"})
    from tpmflow.adapters.quality import _embed

    with pytest.raises(InvalidRequest, match="use_parts_dir"):  # and the quality check says how to agree
        _embed(client, "protein", "never-saved@0.0.1", GOOD, 8, "embedding")


def test_the_fits_entry_point_runs_the_quality_check(
    client: Any, pool: Any, tiny_model_dir: Path, installed: None
) -> None:
    """What `tpmflow adapters fit protein` runs, on the session pool: train, serve, head, baselines."""
    from importlib.metadata import entry_points

    from tpmflow.adapters.parts import load_part, pool_parts_dir, use_parts_dir

    (fit,) = [ep for ep in entry_points(group="tpmflow.fits") if ep.name == "protein"]
    with use_parts_dir(pool_parts_dir(pool)):
        report = fit.load()(client, tiny_model_dir, version="0.0.2-test", steps=30, n_train=96, n_heldout=48)
        _, card = load_part("protein", report.head)
    print(f"\nprotein GRAVY MAE on the tiny core: core {report.core:.3f}, encoder alone {report.encoder_alone:.3f}")
    assert report.metric == "mae" and (report.n_train, report.n_heldout) == (96, 48)
    assert all(np.isfinite([report.core, report.encoder_alone, report.random_projector]))
    assert {"heldout_mae", "heldout_mae_encoder_alone", "heldout_mae_random_projector"} <= set(card.metrics)
