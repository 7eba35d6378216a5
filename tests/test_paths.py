"""Where tpmflow keeps its files (tpmflow.paths), the version id of a model folder, and version
checkouts kept out of the built models. Fast: no vLLM engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tpmflow import paths
from tpmflow.models.card import CARD_FILE, content_hash, version_of


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("TPMFLOW_HOME", "TPMFLOW_MODEL_STORE", "TPMFLOW_PARTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TPMFLOW_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_every_folder_is_under_home_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TPMFLOW_HOME", "TPMFLOW_MODEL_STORE", "TPMFLOW_PARTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    root = tmp_path / ".cache" / "tpmflow"
    assert paths.home() == root
    assert paths.models_dir() == root / "models"
    assert paths.checkouts_dir() == root / "checkouts"
    assert paths.legacy_checkouts_dir() == root / "models" / "versions"
    assert paths.payload_store_dir() == root / "store"
    assert paths.model_store_dir() == root / "store" / "models"
    assert paths.parts_dir() == root / "parts"
    assert paths.pool_logs_dir(8123) == root / "logs" / "pool-8123"
    assert paths.access_db_path() == root / "access.db"
    # checkouts are not built models: `tpmflow models list` reads models_dir()
    assert paths.models_dir() not in paths.checkouts_dir().parents


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TPMFLOW_HOME", "~/elsewhere")
    monkeypatch.setenv("TPMFLOW_MODEL_STORE", "~/weights")
    monkeypatch.setenv("TPMFLOW_PARTS", str(tmp_path / "parts-of-the-pool"))
    assert paths.home() == tmp_path / "elsewhere"
    assert paths.models_dir() == tmp_path / "elsewhere" / "models"
    assert paths.checkouts_dir() == tmp_path / "elsewhere" / "checkouts"
    assert paths.model_store_dir() == tmp_path / "weights"
    assert paths.parts_dir() == tmp_path / "parts-of-the-pool"
    assert paths.payload_store_dir() == tmp_path / "elsewhere" / "store"


def test_the_modules_that_keep_files_use_paths(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tpmflow.access.db import default_database_url
    from tpmflow.adapters.parts import parts_dir
    from tpmflow.config import tpmflow_home
    from tpmflow.payload import StoreConfig
    from tpmflow.versioning import ModelStore, default_store_dir

    assert tpmflow_home() == home, "tpmflow.config.tpmflow_home is still importable"
    assert StoreConfig().root() == home / "store"
    assert StoreConfig(path=str(home / "p")).root() == home / "p"
    assert ModelStore().root == default_store_dir() == home / "store" / "models"
    assert parts_dir() == home / "parts"
    assert default_database_url() == f"sqlite:///{home / 'access.db'}"
    monkeypatch.setenv("TPMFLOW_MODEL_STORE", str(home / "ms"))
    assert ModelStore().root == home / "ms"


def test_paths_and_config_import_no_store() -> None:
    """paths imports nothing from tpmflow; the config is schema only, so it pulls in neither the
    model store nor the model builders (the import circle config/payload/versioning/models is gone)."""
    code = (
        "import json, sys, tpmflow\n"
        "def loaded(): return {m for m in sys.modules if m.startswith('tpmflow')}\n"
        "base = loaded(); import tpmflow.paths; by_paths = loaded() - base\n"
        "import tpmflow.config; by_config = loaded() - base\n"
        "print(json.dumps([sorted(by_paths), sorted(by_config)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    by_paths, by_config = json.loads(out)
    assert by_paths == ["tpmflow.paths"]
    assert not [m for m in by_config if m.startswith(("tpmflow.versioning", "tpmflow.models"))], by_config


def test_version_of_a_model_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    computed = content_hash(folder)
    assert version_of(folder) == computed  # a built model's card names its weights
    card = json.loads((folder / CARD_FILE).read_text())
    (folder / CARD_FILE).write_text(json.dumps({**card, "content_hash": "blake3:" + "a" * 64}))
    assert version_of(folder) == "blake3:" + "a" * 64, "the card is trusted: big folders are not re-hashed"
    (folder / CARD_FILE).write_text("{not json")
    assert version_of(folder) == computed
    (folder / CARD_FILE).unlink()
    assert version_of(folder) == computed
    with pytest.raises(FileNotFoundError):
        version_of(tmp_path)


def _models_list(monkeypatch: pytest.MonkeyPatch) -> str:
    from rich.console import Console
    from typer.testing import CliRunner

    import tpmflow.cli

    monkeypatch.setattr(tpmflow.cli, "console", Console(width=240))
    result = CliRunner().invoke(tpmflow.cli.app, ["models", "list"])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture
def stored(tiny_model_dir: Path, home: Path) -> tuple[str, Path]:
    """The tiny model built in a scratch home and committed to its model store (tag ``a``)."""
    from tpmflow.versioning import ModelStore

    shutil.copytree(tiny_model_dir, paths.models_dir() / "tiny-llama")
    return ModelStore(durable=False).commit(tiny_model_dir, "m", "t", tag="a"), paths.model_store_dir()


def test_a_checked_out_version_is_not_listed_as_a_model(
    stored: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tpmflow.doctor import check_models
    from tpmflow.models.catalog import list_models
    from tpmflow.versioning import materialise

    version, _ = stored
    folder = materialise("a")
    assert folder == paths.checkouts_dir() / version.removeprefix("blake3:")
    assert paths.models_dir() not in folder.parents
    assert [p.name for p, _ in list_models()] == ["tiny-llama"]
    out = _models_list(monkeypatch)
    assert "tiny-llama" in out and out.count("blake3:") == 1 and "no valid card" not in out  # one row: the model
    assert "without a valid card" not in check_models(lambda m: sys.modules[m]).detail


def test_an_old_checkout_under_models_is_moved_out_not_checked_out_again(
    stored: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Earlier releases checked versions out into models/versions/: those are moved (one rename,
    no new checkout) the next time they are served, and never listed as models meanwhile."""
    from tpmflow.models.catalog import list_models
    from tpmflow.versioning import materialise

    version, _ = stored
    old = paths.legacy_checkouts_dir() / version.removeprefix("blake3:")
    old.parent.mkdir(parents=True)
    materialise("a").rename(old)  # what an earlier tpmflow left behind
    (old / "left-by-the-old-release").write_text("")
    assert [p.name for p, _ in list_models()] == ["tiny-llama"]
    assert "versions" not in _models_list(monkeypatch)
    folder = materialise(version)
    assert folder == paths.checkouts_dir() / old.name and (folder / "left-by-the-old-release").exists()
    assert content_hash(folder) == version
    assert not paths.legacy_checkouts_dir().exists(), "models/ holds models only once the old folder is empty"
    # a stale old checkout (not what the store holds) is replaced by a fresh one
    shutil.move(folder, old)
    card = json.loads((old / CARD_FILE).read_text())
    (old / CARD_FILE).write_text(json.dumps({**card, "content_hash": "blake3:" + "f" * 64}))
    folder = materialise("a")
    assert version_of(folder) == version and not (folder / "left-by-the-old-release").exists()


def test_a_pool_config_names_what_each_replica_loads(stored: tuple[str, Path], tiny_model_dir: Path) -> None:
    from tpmflow.config import PoolConfig
    from tpmflow.errors import ModelNotFound
    from tpmflow.versioning.checkout import check_out, replica_loras, replica_model_dir

    version, store = stored
    cfg = PoolConfig(model="tiny-llama", replicas=2, replica_versions=["a", version], model_store=str(store))
    check_out(cfg)
    assert replica_model_dir(cfg, 0) == replica_model_dir(cfg, 1) == paths.checkouts_dir() / version[7:]
    assert replica_loras(cfg, 0) == []
    assert replica_model_dir(PoolConfig(model="tiny-llama")) == paths.models_dir() / "tiny-llama"
    assert replica_model_dir(PoolConfig(model=str(tiny_model_dir))) == tiny_model_dir
    with pytest.raises(ModelNotFound, match="build-demo"):
        check_out(PoolConfig(model="smiles-llama"))
