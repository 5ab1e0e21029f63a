"""Turning projected media tokens into the embedding runs that replace `<image>` / `<vila/video>` tokens.

An image contributes its tokens then the end token ("\\n"); a video contributes, per frame (or per pooled
group of frames with temporal pooling), its tokens then the end token.
"""

from __future__ import annotations

import math

import torch

from nvila_ft.model.config import EncoderSpec


def with_boundaries(tokens: torch.Tensor, start: torch.Tensor | None, end: torch.Tensor | None) -> torch.Tensor:
    """[N, D] -> [start; tokens; end]."""
    parts = [p for p in (start, tokens, end) if p is not None]
    return torch.cat(parts, dim=0) if len(parts) > 1 else tokens


def frames_with_boundaries(frames: torch.Tensor, start: torch.Tensor | None, end: torch.Tensor | None) -> torch.Tensor:
    """[T, N, D] -> [T * (N + ends), D], boundary tokens around every frame."""
    t = frames.shape[0]
    parts = []
    if start is not None:
        parts.append(start.unsqueeze(0).expand(t, -1, -1))
    parts.append(frames)
    if end is not None:
        parts.append(end.unsqueeze(0).expand(t, -1, -1))
    return torch.cat(parts, dim=1).flatten(0, 1)


def mean_pool(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Average consecutive groups of `size` along `dim` (the length must be divisible)."""
    if x.shape[dim] % size:
        raise ValueError(f"cannot pool {x.shape[dim]} entries in groups of {size}")
    return x.unflatten(dim, (-1, size)).mean(dim + 1)


def temporal_spatial_pool(
    frames: torch.Tensor,
    pool_sizes: tuple[tuple[int, int, int], ...],
    start: torch.Tensor | None,
    end: torch.Tensor | None,
    sep: torch.Tensor | None,
) -> torch.Tensor:
    """TSP video encoding: for each (t, h, w) pool size, mean-pool frames/rows/cols, then frame boundaries.

    frames: [T, N, D] projected tokens of one video (N a perfect square).
    """
    count, length, dim = frames.shape
    side = math.isqrt(length)
    outputs = []
    for pool in pool_sizes:
        grid = frames.reshape(count, side, side, dim)
        for axis, size in enumerate(pool):
            grid = mean_pool(grid, size, axis)
        pooled = frames_with_boundaries(grid.flatten(1, 2), start, end)
        if sep is not None:
            pooled = torch.cat([pooled, sep], dim=0)
        outputs.append(pooled)
    return torch.cat(outputs, dim=0)


def encode_video(
    frames: torch.Tensor,
    spec: EncoderSpec,
    start: torch.Tensor | None,
    end: torch.Tensor | None,
    sep: torch.Tensor | None,
) -> torch.Tensor:
    if spec.kind == "tsp_video":
        return temporal_spatial_pool(frames, spec.pool_sizes, start, end, sep)
    return frames_with_boundaries(frames, start, end)


def video_length(spec: EncoderSpec, frames: int, tokens_per_frame: int, boundary_lengths: dict[str, int]) -> int:
    """Embedding positions one video of `frames` frames takes (`boundary_lengths`: token counts of start/end/sep)."""
    ends = boundary_lengths.get("start", 0) + boundary_lengths.get("end", 0)
    if spec.kind != "tsp_video":
        return frames * (tokens_per_frame + ends)
    side = math.isqrt(tokens_per_frame)
    total = 0
    for t, h, w in spec.pool_sizes:
        if frames % t or side % h or side % w:
            raise ValueError(
                f"temporal pooling {t}x{h}x{w} needs the frame count ({frames}) divisible by {t} "
                f"and the token grid ({side}x{side}) by {h}x{w}"
            )
        total += (frames // t) * ((side // h) * (side // w) + ends) + boundary_lengths.get("sep", 0)
    return total
