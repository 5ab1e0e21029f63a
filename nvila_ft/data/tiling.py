"""Cutting an image into the square tiles the vision tower sees (pure PIL).

The grid comes from `nvila_ft.model.media_layout` (the official grid choice); tiles are cut row-major. Every
resize is PIL's bicubic, as `Image.resize` without a filter is for RGB.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from nvila_ft.model.media_layout import candidate_grids, closest_grid


@dataclass(frozen=True)
class TiledImage:
    """Tiles of one image in the order the model consumes them.

    `grid` is (rows, cols) of the largest-scale tiles for Dynamic-S2, None for a single untiled tile.
    """

    tiles: list[Image.Image]
    grid: tuple[int, int] | None = None


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

