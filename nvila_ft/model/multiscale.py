"""Dynamic-S2: tiles of several scales -> one multi-scale feature map -> tiles again.

Each scale's tiles are stitched into a feature map, every map is area-resized (in float32) to the size of
the output scale's map, and the maps are concatenated on channels in scale order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """[n, side*side, C] -> [n, C, side, side] (tokens are a raster over the tile)."""
    n, length, channels = tokens.shape
    side = int(round(length**0.5))
    if side * side != length:
        raise ValueError(f"expected a square number of tokens per tile, got {length}")
    return tokens.transpose(1, 2).reshape(n, channels, side, side)


def merge_tiles(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[rows*cols, C, h, w] tiles in row-major order -> [1, C, rows*h, cols*w] map."""
    count, channels, h, w = tiles.shape
    if count != rows * cols:
        raise ValueError(f"{count} tiles do not fill a {rows}x{cols} grid")
    grid = tiles.reshape(rows, cols, channels, h, w).permute(2, 0, 3, 1, 4)
    return grid.reshape(1, channels, rows * h, cols * w)


def split_tiles(feature_map: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[1, C, H, W] -> [rows*cols, C, H/rows, W/cols] in row-major order (inverse of merge_tiles)."""
    _, channels, height, width = feature_map.shape
    if height % rows or width % cols:
        raise ValueError(f"a {height}x{width} map cannot be split into a {rows}x{cols} grid")
    h, w = height // rows, width // cols
    grid = feature_map.reshape(channels, rows, h, cols, w).permute(1, 3, 0, 2, 4)
    return grid.reshape(rows * cols, channels, h, w)


def merge_scales(
    features: torch.Tensor, scales: list[int], grid: tuple[int, int], output_scale_index: int = -1
) -> torch.Tensor:
    """Multi-scale feature map of one image.

    features: [tiles, N, C] tower output for one image's tiles, ordered as `dynamic_s2_tiles` produced them.
    Returns [1, C * len(scales), H, W] where (H, W) is the map size of `scales[output_scale_index]`.
    """
    maps, start = [], 0
    for scale in scales[:-1]:
        side = scale // scales[0]
        maps.append(merge_tiles(tokens_to_map(features[start : start + side * side]), side, side))
        start += side * side
    rows, cols = grid
    maps.append(merge_tiles(tokens_to_map(features[start : start + rows * cols]), rows, cols))
    if start + rows * cols != features.shape[0]:
        raise ValueError(f"expected {start + rows * cols} tiles for grid {grid}, got {features.shape[0]}")
    size = maps[output_scale_index].shape[-2:]
    resized = [F.interpolate(m.float(), size=size, mode="area").to(m.dtype) for m in maps]
    return torch.cat(resized, dim=1)

