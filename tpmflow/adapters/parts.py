"""Trained adapter parts — projectors and heads — saved as safetensors with a card, served by
``name@version``.

A part belongs to one core model (its content hash and hidden size): the replica refuses to use
it with another. Layout: ``<parts dir>/<adapter>/<name>@<version>/{card.json, weights.safetensors}``.

One folder must be shared by whoever writes parts and the pool that reads them. A pool's replicas
read its config's ``parts_path``, else the ``parts_dir()`` of the process that started them
(``$TPMFLOW_PARTS``, else ``$TPMFLOW_HOME/parts``); this process reads and writes ``parts_dir()``.
``pool_parts_dir(pool)`` names a pool's folder and ``use_parts_dir(folder)`` points this process
at it, so a part saved or loaded here is the one the pool serves. Every function here also takes
the folder explicitly as ``root``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tpmflow.errors import InvalidRequest
from tpmflow.paths import parts_dir

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_VERSION = re.compile(r"^[0-9A-Za-z._-]{1,32}$")
PartKind = Literal["projector", "ridge-regression", "softmax-classifier"]


class PartCard(BaseModel):
    """Everything a reader needs to trust (or distrust) a trained part's numbers."""

    adapter: str
    name: str
    version: str
    kind: PartKind
    owner: str = "facility"
    modality: str
    base_model: str
    base_content_hash: str
    hidden_size: int
    target: str = ""
    classes: list[str] = Field(default_factory=list, description="labels of a classifier, in output order")
    settings: dict[str, Any] = Field(default_factory=dict, description="adapter settings the part was trained with")
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict, description="held-out metrics, the part and baselines")


def pool_parts_dir(pool: Any) -> Path:
    """The folder a pool reads parts from. ``pool``: a running ``Pool``, a ``PoolConfig``, or the
    path of a pool config YAML. Its ``parts_path``, else ``parts_dir()`` here (what replicas started
    from this process inherit)."""
    cfg = getattr(pool, "cfg", pool)
    if isinstance(cfg, str | Path):
        from tpmflow.config import PoolConfig

        cfg = PoolConfig.from_yaml(str(cfg))
    configured = getattr(cfg, "parts_path", None)
    return Path(configured).expanduser() if configured else parts_dir()


@contextmanager
def use_parts_dir(folder: str | Path) -> Iterator[Path]:
    """Within the block, this process saves and loads parts in ``folder`` (it sets ``$TPMFLOW_PARTS``,
    which ``save_projector``, a ``SoftTokenAdapter`` given a part, ``commit_part`` and pools started
    here all read). ``with use_parts_dir(pool_parts_dir(pool)):`` makes them the pool's parts."""
    folder = Path(folder).expanduser()
    before = os.environ.get("TPMFLOW_PARTS")
    os.environ["TPMFLOW_PARTS"] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop("TPMFLOW_PARTS", None)
        else:
            os.environ["TPMFLOW_PARTS"] = before


def _root(root: str | Path | None) -> Path:
    return Path(root).expanduser() if root is not None else parts_dir()


def check_part_name(adapter: str, spec: str) -> tuple[str, str]:
    """(name, version) of ``name`` or ``name@version``; names end up in paths, so they are checked."""
    name, _, version = spec.partition("@")
    if not _NAME.match(adapter) or not _NAME.match(name) or (version and not _VERSION.match(version)):
        raise InvalidRequest(f"bad part name {adapter!r} {spec!r} (expected name or name@version)")
    return name, version


# Said when a part is missing: the usual cause is a part saved in one folder and read from another.
_WHERE = "in the parts folder ($TPMFLOW_PARTS, or the pool's parts_path; see docs/adapters.md)"


def part_path(adapter: str, spec: str, root: str | Path | None = None) -> Path:
    """Folder of ``name`` (newest version) or ``name@version`` for an adapter."""
    name, version = check_part_name(adapter, spec)
    folder = _root(root) / adapter
    if version:
        path = folder / f"{name}@{version}"
    else:
        found = sorted(folder.glob(f"{name}@*"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise InvalidRequest(f"no part {name!r} for adapter {adapter!r} {_WHERE}")
        path = found[-1]
    if not (path / "card.json").is_file():
        raise InvalidRequest(f"no part {spec!r} for adapter {adapter!r} {_WHERE}")
    return path


def save_part(tensors: dict[str, Any], card: PartCard, root: str | Path | None = None) -> Path:
    """Write weights (numpy arrays or torch tensors) and card; the card last, so a folder with a
    card always has its weights. A version is never overwritten: results name it, and replicas
    that loaded it keep serving it."""
    path = _root(root) / card.adapter / f"{card.name}@{card.version}"
    if (path / "card.json").exists():
        raise FileExistsError(
            f"{card.adapter} part {card.name}@{card.version} exists in {path.parent}; choose a new version"
        )
    path.mkdir(parents=True, exist_ok=True)
    if tensors and all(hasattr(t, "detach") for t in tensors.values()):
        from safetensors.torch import save_file as save_torch

        save_torch({k: v.detach().contiguous() for k, v in tensors.items()}, str(path / "weights.safetensors"))
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(path / "weights.safetensors"))
    (path / "card.json").write_text(card.model_dump_json(indent=2) + "\n")
    return path


def update_metrics(adapter: str, spec: str, metrics: dict[str, Any], root: str | Path | None = None) -> PartCard:
    """Add held-out metrics to a saved part's card (its weights stay as they are)."""
    path = part_path(adapter, spec, root)
    card = PartCard.model_validate(json.loads((path / "card.json").read_text()))
    card.metrics.update(metrics)
    tmp = path / "card.json.tmp"
    tmp.write_text(card.model_dump_json(indent=2) + "\n")
    tmp.replace(path / "card.json")
    return card


def resolved_spec(adapter: str, spec: str, root: str | Path | None = None) -> str:
    """``name`` (the newest version) or ``name@version`` as the exact ``name@version`` served."""
    return part_path(adapter, spec, root).name


def load_part(
    adapter: str, spec: str, kind: str | None = None, root: str | Path | None = None
) -> tuple[Path, PartCard]:
    """The folder and card of a part; ``InvalidRequest`` when it is missing or of another kind."""
    path = part_path(adapter, spec, root)
    card = PartCard.model_validate(json.loads((path / "card.json").read_text()))
    if kind is not None and card.kind != kind and not (kind == "head" and card.kind != "projector"):
        raise InvalidRequest(f"part {card.name}@{card.version} of adapter {adapter!r} is a {card.kind}, not a {kind}")
    return path, card


def list_parts(root: str | Path | None = None) -> list[PartCard]:
    """Every part's card in the folder, by adapter then name."""
    return [PartCard.model_validate(json.loads(p.read_text())) for p in sorted(_root(root).glob("*/*/card.json"))]
