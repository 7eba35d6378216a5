"""Stored versions as folders vLLM loads: checked out once per version under
``tpmflow.paths.checkouts_dir()``, then reused."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tpmflow.models.card import card_version
from tpmflow.paths import checkouts_dir, legacy_checkouts_dir
from tpmflow.versioning.refs import check_version_id
from tpmflow.versioning.store import ModelStore

#: Written last into a checkout: the version it holds (a folder without it is not trusted).
MARKER = ".tpmflow-version"


def materialise(name_or_id: str, store_root: str | Path | None = None) -> Path:
    """The folder of a stored version (id, unique id prefix or tag), checked out on first use.

    Keyed by the resolved version id, so a tag that moves gets a new folder and an old result's
    version stays where it was. The checkout goes to a private folder renamed into place, so a
    replica never loads half a model and two replicas starting at once both end with a whole one.
    """
    store = ModelStore(store_root)
    version = check_version_id(store.resolve(name_or_id), f"the store's answer for {name_or_id!r}")
    dest = checkouts_dir() / version.removeprefix("blake3:")
    _adopt_legacy(dest)
    if dest.is_dir():
        if _marker(dest) == version and card_version(dest) in (None, version):
            return dest
        shutil.rmtree(dest)  # not what the store holds (edited by hand, or an older tpmflow's checkout)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process, thread and node (replicas on several nodes may share TPMFLOW_HOME).
    scratch = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    store.checkout(version, scratch)
    (scratch / MARKER).write_text(version)
    try:
        os.replace(scratch, dest)
    except OSError:  # another process put the same version in place first
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


@dataclass(frozen=True)
class LoraCheckout:
    """A LoRA version ready to serve as a vLLM adapter: its parent's folder and its factors' folder."""

    version: str
    parent: str
    base_dir: Path
    adapter_dir: Path


def materialise_lora(name_or_id: str, store_root: str | Path | None = None) -> LoraCheckout:
    """A LoRA version as a PEFT folder (exported once, like ``materialise``) beside its parent's
    checkout. ``InvalidRequest`` says why a version cannot be served as an adapter."""
    from tpmflow.errors import InvalidRequest
    from tpmflow.versioning.lora import write_peft

    store = ModelStore(store_root)
    version = check_version_id(store.resolve(name_or_id), f"the store's answer for {name_or_id!r}")
    try:
        parent, factors = store.lora_factors(version)
    except InvalidRequest as exc:
        raise InvalidRequest(f"version {version} cannot be served as a LoRA adapter: {exc}") from exc
    base_dir = materialise(parent, store_root)
    dest = checkouts_dir() / f"lora-{version.removeprefix('blake3:')}"
    _adopt_legacy(dest)
    if dest.is_dir() and _marker(dest) == version:
        return LoraCheckout(version, parent, base_dir, dest)
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    write_peft(factors, scratch, base_model=parent)
    (scratch / MARKER).write_text(version)
    try:
        os.replace(scratch, dest)
    except OSError:  # another process exported it first
        shutil.rmtree(scratch, ignore_errors=True)
    return LoraCheckout(version, parent, base_dir, dest)


def _marker(folder: Path) -> str | None:
    try:
        return (folder / MARKER).read_text().strip()
    except OSError:
        return None


def _adopt_legacy(dest: Path) -> None:
    """Move a checkout an earlier tpmflow made under ``models/versions`` to ``dest``.

    A rename, so a large version is not checked out again; the caller then checks the folder like
    any other. When the move fails (another process moved it first, or ``models/`` is on another
    file system) the version is simply checked out anew.
    """
    old = legacy_checkouts_dir() / dest.name
    if dest.exists() or not old.is_dir():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(old, dest)
    except OSError:
        return
    with contextlib.suppress(OSError):  # once empty, models/ holds models only
        legacy_checkouts_dir().rmdir()
