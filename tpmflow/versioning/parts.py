"""Trained adapter parts (projectors, heads) versioned in the model store, beside the weights.

A part folder (``weights.safetensors`` + ``card.json``) is committed like a model folder and
tagged ``part.<adapter>.<name>.<version>``, so a result that names ``name@version`` can be
reproduced on a machine that never trained it: ``restore_part`` puts the exact folder back where
replicas look for parts.
"""

from __future__ import annotations

import getpass
import shutil
import tempfile
from pathlib import Path

from tpmflow.adapters.parts import check_part_name, resolved_spec
from tpmflow.errors import InvalidRequest
from tpmflow.paths import parts_dir
from tpmflow.versioning.store import ModelStore


def part_tag(adapter: str, spec: str) -> str:
    """The store tag of ``name@version`` (tags allow no ``@``)."""
    name, _, version = spec.partition("@")
    if not version:
        raise InvalidRequest(f"a stored part is named with its version (name@version), not {spec!r}")
    return f"part.{adapter}.{name}.{version}"


def commit_part(adapter: str, spec: str, store: ModelStore | None = None, author: str | None = None) -> str:
    """Commit a local part (``name`` means its newest version) and return its store version id."""
    from tpmflow.adapters.parts import part_path

    store = store or ModelStore()
    exact = resolved_spec(adapter, spec)
    return store.commit(
        part_path(adapter, exact),
        f"{adapter} part {exact}",
        author or getpass.getuser(),
        tag=part_tag(adapter, exact),
    )


def restore_part(adapter: str, spec: str, store: ModelStore | None = None) -> Path:
    """Check ``name@version`` out of the store into the parts folder (kept if already there)."""
    store = store or ModelStore()
    check_part_name(adapter, spec)
    version = store.resolve(part_tag(adapter, spec))
    dest = parts_dir() / adapter / spec
    if (dest / "card.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        store.checkout(version, scratch)
        if dest.exists():  # a folder without a card is an interrupted save: the store's copy wins
            shutil.rmtree(dest)
        scratch.replace(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest
