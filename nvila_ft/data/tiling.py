"""Cutting an image into the square tiles the vision tower sees (pure PIL, no model needed).

Grid choice and tile order follow the official NVILA preprocessing: candidate grids are (columns, rows)
pairs sorted by tile count, the closest aspect ratio wins, ties go to the larger grid only when the image
has enough pixels for it. Every resize is PIL's bicubic, as `Image.resize` without a filter is for RGB.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class TiledImage:
    """Tiles of one image in the order the model consumes them.

    `grid` is (rows, cols) of the largest-scale tiles for Dynamic-S2, None for a single untiled tile.
    """

    tiles: list[Image.Image]
    grid: tuple[int, int] | None = None


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, in the official order.

    The official code builds a Python set and sorts it by tile count; sort is stable, so grids with the
    same count keep the set's iteration order, which decides ties. We build the set the same way.
    """
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: list[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to width/height."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def cut_grid(image: Image.Image, cols: int, rows: int, tile_size: int) -> list[Image.Image]:
    """Resize to (cols*tile, rows*tile) and cut row-major: tile t sits at column t % cols, row t // cols."""
    resized = image.resize((cols * tile_size, rows * tile_size))
    return [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]


def dynamic_tiles(
    image: Image.Image, tile_size: int, min_tiles: int = 1, max_tiles: int = 12, thumbnail: bool = True
) -> TiledImage:
    """NVILA-Lite tiling: aspect-matched grid, plus a whole-image thumbnail last when there is more than one tile."""
    cols, rows = closest_grid(*image.size, candidate_grids(min_tiles, max_tiles), tile_size)
    tiles = cut_grid(image, cols, rows, tile_size)
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size)))
    return TiledImage(tiles)


def dynamic_s2_tiles(image: Image.Image, scales: list[int], max_tiles: int = 12) -> TiledImage:
    """NVILA Dynamic-S2 tiling: square grids for every scale but the last, an aspect-matched grid for the last.

    Tiles come as [scale-0 tiles, scale-1 tiles, ..., last-scale tiles]; `grid` is the last scale's (rows, cols).
    """
    tile = scales[0]
    tiles: list[Image.Image] = []
    for scale in scales[:-1]:
        side = scale // tile
        tiles += cut_grid(image, side, side, tile)
    min_tiles = (scales[-1] // tile) ** 2
    cols, rows = closest_grid(*image.size, candidate_grids(min_tiles, max_tiles), tile)
    tiles += cut_grid(image, cols, rows, tile)
    return TiledImage(tiles, grid=(rows, cols))


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas (the official `pad` mode)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def s2_tile_count(scales: list[int], grid: tuple[int, int]) -> int:
    """Tiles one Dynamic-S2 image sends through the tower: square scales plus the last scale's grid."""
    return sum((s // scales[0]) ** 2 for s in scales[:-1]) + grid[0] * grid[1]
