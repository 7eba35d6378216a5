"""The torch half of the soft-token route: the projector and the encoder + projector module.

Kept apart from ``tpmflow.adapters.soft`` so that importing the adapter base (as a client or an
adapter package does to name its class) needs no torch; torch comes with the ``cpu`` / ``gpu``
extras and is imported here only when a model is built, loaded or trained.
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """Per-token two-layer MLP from the encoder's width to the core's hidden size (LLaVA-1.5)."""

    def __init__(self, d_in: int, hidden_size: int, d_mid: int | None = None) -> None:
        super().__init__()
        d_mid = d_mid or max(d_in, hidden_size)
        self.net = nn.Sequential(nn.Linear(d_in, d_mid), nn.GELU(), nn.Linear(d_mid, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SoftTokenModel(nn.Module):
    """Encoder then projector: ``[B, *input_shape]`` to ``[B, K, hidden]`` soft tokens."""

    def __init__(self, encoder: nn.Module, projector: Projector) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's own features, mean over its K tokens: the no-core-model baseline."""
        return self.encoder(x).mean(dim=1)
