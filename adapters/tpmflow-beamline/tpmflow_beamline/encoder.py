"""A small ViT-style patch encoder: ``[B, P, patch*patch]`` frame patches to ``[B, P, dim]``.

Each patch stays one token (no pooling), so the core model sees where on the detector the signal
is; the learned position embedding carries that geometry. Tiny on purpose: it is trained on a few
thousand frames against a frozen core model, and must run on a CPU replica.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchEncoder(nn.Module):
    """Linear patch embedding + learned positions + ``depth`` pre-norm transformer layers."""

    def __init__(self, n_patches: int, patch_dim: int, dim: int = 128, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(patch_dim, dim)
        self.position = nn.Parameter(torch.randn(1, n_patches, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.embed(x) + self.position))
