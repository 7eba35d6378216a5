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


def check_tag_name(name: str) -> str:
    """Tags are plain names; ones that could be mistaken for a version id are refused."""
    if not _TAG.match(name) or name.startswith("blake3"):
        raise InvalidRequest(f"bad tag name {name!r}: use letters, digits, '.', '_' or '-' (not 'blake3…')")
    return name


class Tags:
    """The tag files of one store."""

    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root, self.tmp_dir = root, tmp_dir

    def get(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text().strip() if _TAG.match(name) and path.is_file() else None

    def set(self, name: str, version: str) -> None:
        write_atomic(self.root / check_tag_name(name), version.encode() + b"\n", self.tmp_dir)

    def all(self) -> dict[str, str]:
        """Every tag -> version id, by name."""
        if not self.root.is_dir():
            return {}
        return {p.name: p.read_text().strip() for p in sorted(self.root.iterdir()) if _TAG.match(p.name)}
