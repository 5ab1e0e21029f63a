"""Multimodal projector: spatial-to-channel compression (STC) + LayerNorm + MLP, with the official key names.

Module indices inside `layers` are those of the official Sequential (parameter-free modules included), so
state-dict keys such as `layers.1.weight` match the released `mm_projector/model.safetensors`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SpatialToChannel(nn.Module):
    """[B, n*n, C] -> [B, ceil(n/k)^2, k*k*C]: each k x k window of tokens becomes one token.

    The grid is zero-padded at the bottom, then the right, to a multiple of k. Within a window the k*k
    positions are concatenated row-major, each contributing a contiguous C-slice.
    """

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, channels = tokens.shape
        side = math.isqrt(length)
        if side * side != length:
            raise ValueError(f"SpatialToChannel needs a square token grid, got {length} tokens")
        k = self.factor
        grid = tokens.reshape(batch, side, side, channels)
        pad = (-side) % k
        if pad:
            grid = F.pad(grid, (0, 0, 0, pad, 0, pad))  # channels untouched, then right columns, then bottom rows
        out = (side + pad) // k
        grid = grid.reshape(batch, out, k, out, k, channels).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(batch, out * out, k * k * channels)


def build_projector_layers(projector_type: str, in_channels: int, hidden_size: int) -> nn.Module:
    """The official `layers` module for a projector type (in_channels = mm_hidden_size, hidden = LLM width)."""
    c, d = in_channels, hidden_size
    if projector_type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return nn.Sequential(SpatialToChannel(2), nn.LayerNorm(4 * c), nn.Linear(4 * c, d), nn.GELU(), nn.Linear(d, d))
    if projector_type == "mlp_downsample_3x3_fix":
        return nn.Sequential(
            SpatialToChannel(3),
            nn.LayerNorm(9 * c),
            nn.Linear(9 * c, 3 * c),
            nn.GELU(),
            nn.LayerNorm(3 * c),
            nn.Linear(3 * c, d),
            nn.GELU(),
            nn.Linear(d, d),
        )
    if projector_type == "linear":
        return nn.Linear(c, d)
    if projector_type == "identity":
        return nn.Identity()
    if projector_type.startswith("mlp") and projector_type.endswith("x_gelu"):
        depth = int(projector_type[3:-6])
        modules: list[nn.Module] = [nn.Linear(c, d)]
        for _ in range(depth - 1):
            modules += [nn.GELU(), nn.Linear(d, d)]
        return nn.Sequential(*modules)
    raise ValueError(f"unknown mm_projector_type {projector_type!r}")


class MultimodalProjector(nn.Module):
    """Maps vision features [tiles, N, mm_hidden] to LLM embeddings [tiles, N', llm_hidden]."""

    def __init__(self, projector_type: str, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.projector_type = projector_type
        self.layers = build_projector_layers(projector_type, in_channels, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)
