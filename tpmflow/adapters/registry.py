"""Adapters installed as packages, found through the ``tpmflow.adapters`` entry-point group."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from tpmflow.adapters.base import Adapter
from tpmflow.errors import InvalidRequest

ENTRY_POINT_GROUP = "tpmflow.adapters"


def available_adapters() -> dict[str, EntryPoint]:
    """Installed adapters by name (the entry point's name)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_adapter(name: str, config: dict[str, Any] | None = None) -> Adapter:
    """Instantiate an installed adapter; ``InvalidRequest`` names what is installed when it is not."""
    found = available_adapters()
    if name not in found:
        have = ", ".join(sorted(found)) or "none"
        raise InvalidRequest(f"adapter {name!r} is not installed in this pool (installed: {have})")
    factory = found[name].load()
    adapter = factory.from_config(config) if config is not None and hasattr(factory, "from_config") else factory()
    if not isinstance(adapter, Adapter):
        raise InvalidRequest(f"entry point {name!r} does not provide a tpmflow Adapter")
    return adapter
