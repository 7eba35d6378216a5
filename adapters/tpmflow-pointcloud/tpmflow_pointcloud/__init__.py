"""tpmflow's point-cloud adapter (see README.md).

The adapter is imported lazily: sandboxed parser processes unpickle
``tpmflow_pointcloud.readers.parse_cloud_bytes``, which imports this package, and they should
load numpy only, not torch and tpmflow's soft-token machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tpmflow_pointcloud.adapter import PointCloudAdapter, PointCloudSettings

__all__ = ["PointCloudAdapter", "PointCloudSettings"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tpmflow_pointcloud import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
