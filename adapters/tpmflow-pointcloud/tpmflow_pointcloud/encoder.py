"""A small PointNet patch encoder: one feature vector (one soft token) per patch.

Input ``[B, G, k + 1, 3]`` as made by ``geometry.make_patches``: row 0 of each patch is its centre,
rows 1..k its points relative to that centre. A shared per-point MLP (3 -> 64 -> dim) and a max
over the k points give an order-invariant summary of the patch's local shape (PointNet); an MLP
embedding of the centre is added so each token also says where on the object the patch lies (the
core model sees the G tokens as a sequence, with no other notion of 3-D position). Output
``[B, G, dim]``, layer-normalised so the projector sees features on one scale.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchPointNet(nn.Module):
    """``[B, G, k + 1, 3]`` patches (centre first) to ``[B, G, dim]`` tokens."""

    def __init__(self, dim: int = 128, width: int = 64) -> None:
        super().__init__()
        self.dim = dim
        self.point_mlp = nn.Sequential(nn.Linear(3, width), nn.GELU(), nn.Linear(width, dim))
        self.centre_mlp = nn.Sequential(nn.Linear(3, width), nn.GELU(), nn.Linear(width, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if patches.ndim != 4 or patches.shape[-1] != 3 or patches.shape[-2] < 2:
            raise ValueError(f"expected [B, G, k + 1, 3] patches, got {tuple(patches.shape)}")
        centres, points = patches[:, :, 0], patches[:, :, 1:]
        local = self.point_mlp(points).amax(dim=2)  # [B, G, dim]: max over the patch's k points
        return self.norm(local + self.centre_mlp(centres))
