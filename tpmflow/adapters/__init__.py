"""Domain adapters: the plug point that turns scientific data into model inputs and back.

An adapter package registers a factory under the entry-point group ``tpmflow.adapters``; a
campaign names the adapter and sends its own items. See ``base.Adapter`` for the protocol.
"""

from tpmflow.adapters.base import (
    Adapter,
    AdapterFit,
    Decoded,
    EncodedEmbeds,
    EncodedText,
    ItemError,
    check_fits,
)
from tpmflow.adapters.registry import ENTRY_POINT_GROUP, available_adapters, load_adapter

__all__ = [
    "Adapter",
    "AdapterFit",
    "Decoded",
    "EncodedEmbeds",
    "EncodedText",
    "ItemError",
    "check_fits",
    "ENTRY_POINT_GROUP",
    "available_adapters",
    "load_adapter",
]
