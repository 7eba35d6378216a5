"""The encoder: one-hot residues ``[B, 21, L]`` to ``[B, K, width]`` feature vectors."""

from __future__ import annotations

import torch
from torch import nn


class SequenceEncoder(nn.Module):
    """Two 1-D convolutions along the sequence, then K pooled windows: each soft token summarises
    one stretch of the sequence."""

    def __init__(self, channels: int, width: int, tokens: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(channels, width, kernel_size=5, padding=2),
            nn.GELU(),
            nn.Conv1d(width, width, kernel_size=5, padding=2),
            nn.GELU(),
        )
        self.pool = nn.AdaptiveAvgPool1d(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x)).transpose(1, 2)
