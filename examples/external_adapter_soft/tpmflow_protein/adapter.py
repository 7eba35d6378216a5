"""``ProteinAdapter``: the domain half of a soft-token adapter (settings, parsing, the encoder)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tpmflow.adapters import ItemError
from tpmflow.adapters.soft import SoftTokenAdapter

if TYPE_CHECKING:
    from torch import nn

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the 20 standard one-letter codes; channel 20 marks "a residue here"
_CHANNEL = {a: i for i, a in enumerate(AMINO_ACIDS)}


@dataclass(frozen=True)
class ProteinSettings:
    """Everything ``config()`` returns and ``from_config()`` takes (JSON: it travels to the replica).
    A trained part records the settings it was trained with, and serving adopts them."""

    part: str | None = None  # the trained encoder + projector to serve, "name@version"
    prefix: str = ""  # text embedded before the soft tokens
    suffix: str = ""  # and after them
    max_length: int = 64  # residues; longer sequences are refused
    tokens: int = 8  # soft tokens per sequence


class ProteinAdapter(SoftTokenAdapter):
    """Protein sequences as ``tokens`` soft tokens from a 1-D convolution over one-hot residues."""

    name: ClassVar[str] = "protein"
    version: ClassVar[str] = "0.1.0"
    modality: ClassVar[str] = "protein-sequence"
    settings_type: ClassVar[type] = ProteinSettings
    encoder_dim: ClassVar[int] = 32

    def prepare(self, items: Sequence[Any]) -> list[np.ndarray | ItemError]:
        """Each sequence as a float32 [21, max_length] one-hot array, or the reason it is refused.
        Never raises: a bad item becomes its ``ItemError`` and the rest of the batch goes on."""
        limit = self.settings.max_length
        out: list[np.ndarray | ItemError] = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                out.append(
                    ItemError(i, f"expected a sequence of one-letter amino-acid codes, got {type(item).__name__}")
                )
                continue
            if len(item) > 2 * limit:  # bound the work before looking at the text
                out.append(ItemError(i, f"{len(item)} characters exceeds the limit of {limit} residues"))
                continue
            seq = item.strip().upper()
            unknown = sorted(set(seq) - set(AMINO_ACIDS))
            if not seq:
                out.append(ItemError(i, "empty sequence"))
            elif len(seq) > limit:
                out.append(ItemError(i, f"{len(seq)} residues exceeds the limit of {limit}"))
            elif unknown:
                out.append(ItemError(i, f"not one of the 20 standard amino acids: {''.join(unknown)[:20]!r}"))
            else:
                x = np.zeros((len(AMINO_ACIDS) + 1, limit), dtype=np.float32)
                x[[_CHANNEL[a] for a in seq], np.arange(len(seq))] = 1.0
                x[len(AMINO_ACIDS), : len(seq)] = 1.0
                out.append(x)
        return out

    def build_encoder(self) -> nn.Module:
        # torch is imported here, not at the top, so naming the adapter (a client, `tpmflow adapters
        # list`) needs no torch; the pool and training have it.
        from tpmflow_protein.encoder import SequenceEncoder

        return SequenceEncoder(len(AMINO_ACIDS) + 1, self.encoder_dim, self.settings.tokens)
