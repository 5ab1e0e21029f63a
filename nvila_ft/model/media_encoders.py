"""Videos: the projected tokens of every frame, or of every pooled group of frames with temporal pooling (TSP).

The end token after each (pooled) frame is not made here: the processor wrote it into `input_ids` as text ids
(`nvila_ft.model.media_layout`), and only the frames' features are scattered into their placeholders.
"""

from __future__ import annotations

import math

import torch

from nvila_ft.model.config import EncoderSpec


def mean_pool(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Average consecutive groups of `size` along `dim` (the length must be divisible)."""
    if x.shape[dim] % size:
        raise ValueError(f"cannot pool {x.shape[dim]} entries in groups of {size}")
    return x.unflatten(dim, (-1, size)).mean(dim + 1)


def temporal_spatial_pool(frames: torch.Tensor, pool_sizes: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """TSP: for each (t, h, w) pool size, mean-pool frames / rows / cols; [T, N, D] -> [sum of pooled tokens, D].

    frames: projected tokens of one video, N a perfect square.
    """
    count, length, dim = frames.shape
    side = math.isqrt(length)
    outputs = []
    for pool in pool_sizes:
        grid = frames.reshape(count, side, side, dim)
        for axis, size in enumerate(pool):
            grid = mean_pool(grid, size, axis)
        outputs.append(grid.reshape(-1, dim))
    return torch.cat(outputs, dim=0)


def video_features(frames: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """[T, N, D] projected frames of one video -> [tokens, D] in the order of its placeholders."""
    if spec.kind == "tsp_video":
        return temporal_spatial_pool(frames, spec.pool_sizes)
    return frames.reshape(-1, frames.shape[-1])
