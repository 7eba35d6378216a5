"""Tags: human names for versions (``prod``, ``run-42``), one small file each under ``refs/tags``.

A tag is written atomically after the manifest it names, so a tag never points at a version that
is not fully stored.
"""

from __future__ import annotations

import re
from pathlib import Path

from tpmflow.errors import InvalidRequest
from tpmflow.versioning.atomic import write_atomic

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_VERSION_PREFIX = re.compile(r"^[0-9a-f]{6,64}$")  # what ``resolve`` would read as an id prefix
_VERSION_ID = re.compile(r"^blake3:[0-9a-f]{64}$")


def check_tag_name(name: str) -> str:
    """Tags are plain names; ones that could be mistaken for a version id (or a prefix of one)
    are refused, since a tag would otherwise shadow the version a config or a pin names."""
    if not _TAG.match(name) or name.startswith("blake3") or _VERSION_PREFIX.match(name):
        raise InvalidRequest(
            f"bad tag name {name!r}: use letters, digits, '.', '_' or '-', not 'blake3…' nor hex that reads as an id"
        )
    return name


def check_version_id(value: str, where: str) -> str:
    """A version id read from disk is used in paths: anything else is a damaged store."""
    if not _VERSION_ID.match(value):
        raise InvalidRequest(f"{where} holds {value[:80]!r}, not a version id (blake3:<64 hex>)")
    return value


class Tags:
    """The tag files of one store."""

    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root, self.tmp_dir = root, tmp_dir

    def get(self, name: str) -> str | None:
        path = self.root / name
        if not (_TAG.match(name) and path.is_file()):
            return None
        return check_version_id(path.read_text().strip(), f"tag {name}")

    def set(self, name: str, version: str) -> None:
        write_atomic(self.root / check_tag_name(name), version.encode() + b"\n", self.tmp_dir)

    def all(self) -> dict[str, str]:
        """Every tag -> version id, by name."""
        if not self.root.is_dir():
            return {}
        return {p.name: p.read_text().strip() for p in sorted(self.root.iterdir()) if _TAG.match(p.name)}
