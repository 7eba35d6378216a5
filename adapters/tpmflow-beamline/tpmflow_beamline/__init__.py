"""tpmflow's detector-frame adapter (see README.md).

``BeamlineAdapter`` is imported lazily: ``nexus.read_frame`` runs in spawned sandbox children,
which import this package, and should not pay for torch there.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BeamlineAdapter", "BeamlineSettings"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tpmflow_beamline import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
