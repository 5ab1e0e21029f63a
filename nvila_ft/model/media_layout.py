"""The one place that knows how images and videos are laid out for NVILA: tile grids, tiles through the
vision tower, feature tokens, and the run of LLM positions each media item takes.

Every family and mode of the official code, from sizes alone (no pixels, no weights):

- grid choice (§2.2 of the spec): candidate (columns, rows) grids sorted by tile count, the closest aspect
  ratio wins, ties go to the larger grid only when the image has enough pixels for it;
- NVILA (Dynamic-S2): one square grid per scale but the last, an aspect-matched grid for the last; the merged
  map is cut into the output grid, `tokens_per_tile` tokens each, as one media item;
- NVILA-Lite (dynamic): every tile (and a thumbnail when there are several) is its own media item, followed by
  a literal "\\n" in the text;
- resize / pad / default, video frames, and every image of a multi-image prompt at inference: one tile;
- video: per frame, or per pooled group of frames with temporal pooling (TSP), tokens then the end token.

A media item's run is `start ids + placeholder x tokens + end ids` (the boundary text of the encoder, "\\n" by
default, as token ids); the processor writes it into `input_ids` and the model scatters the item's features
into the placeholders. The processor, the model, data validation, token counting and the planner all ask here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nvila_ft.model.config import EncoderSpec, NVILAConfig


# ---------------------------------------------------------------------------------------------- grids
def temporal_pools(frames: int, side: int, pool_sizes: tuple[tuple[int, int, int], ...]) -> list[tuple[int, int]]:
    """(pooled frames, tokens per pooled frame) for each [t, h, w] pool of temporal-spatial pooling over `frames`
    frames of side x side tokens; ValueError when a pool does not divide them."""
    pools = []
    for t, h, w in pool_sizes:
        if frames % t or side % h or side % w:
            raise ValueError(
                f"temporal pooling {t}x{h}x{w} needs the frame count ({frames}) divisible by {t} "
                f"and the token grid ({side}x{side}) by {h}x{w}"
            )
        pools.append((frames // t, (side // h) * (side // w)))
    return pools


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, in the official order.

    The official code builds a Python set and sorts it by tile count; sort is stable, so grids with the
    same count keep the set's iteration order, which decides ties. We build the set the same way: its comprehension
    (`for n in min..max, i in 1..n, j in 1..n`) first adds a pair at n = max(min_tiles, i, j) and adding it again
    changes nothing, so adding each pair once, in that order, gives the same set and the same iteration order in
    O(max_tiles log max_tiles) steps instead of O(max_tiles^3).
    """
    grids: set[tuple[int, int]] = set()
    for n in range(min_tiles, max_tiles + 1):
        if n == min_tiles:
            new = [(i, j) for i in range(1, n + 1) for j in range(1, n + 1)]
        else:  # the pairs with max(i, j) == n, in the comprehension's order
            new = [(i, n) for i in range(1, min(n - 1, max_tiles // n) + 1)] + [(n, j) for j in range(1, min(n, max_tiles // n) + 1)]
        grids.update(g for g in new if min_tiles <= g[0] * g[1] <= max_tiles)
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


def s2_grid(config: NVILAConfig, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of an image's largest-scale Dynamic-S2 tiles."""
    grids = candidate_grids(config.s2_min_tiles, config.max_tiles)
    cols, rows = closest_grid(width, height, grids, config.s2_scales[0])
    return rows, cols


def lite_grid(config: NVILAConfig, width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of an image's NVILA-Lite tiles (the thumbnail comes on top when there are several)."""
    cols, rows = closest_grid(width, height, candidate_grids(config.min_tiles, config.max_tiles), config.tile_size)
    return rows, cols


def s2_tile_count(scales: list[int], grid: tuple[int, int]) -> int:
    """Tiles one Dynamic-S2 image sends through the tower: square scales plus the last scale's grid."""
    return sum((s // scales[0]) ** 2 for s in scales[:-1]) + grid[0] * grid[1]


def output_grid(scales: list[int], grid: tuple[int, int], output_scale_index: int = -1) -> tuple[int, int]:
    """Tile grid of the merged map: the image's grid when resizing to the last scale, else that scale's square."""
    if output_scale_index in (-1, len(scales) - 1):
        return grid
    side = scales[output_scale_index] // scales[0]
    return side, side


# ---------------------------------------------------------------------------------------------- one model
@dataclass(frozen=True)
class ImagePlan:
    """How one image of a given size becomes model input."""

    tiles: int  # tiles through the vision tower
    grid: tuple[int, int] | None  # (rows, cols): Dynamic-S2's last scale or NVILA-Lite's tiles; None: one tile
    items: int  # image media items (NVILA-Lite: one per tile and thumbnail)
    tokens: int  # feature tokens of all its items (the placeholders the model fills)
    positions: int  # LLM positions: tokens, boundary tokens and NVILA-Lite's literal "\n" after each tile


class MediaLayout:
    """The layout arithmetic of one checkpoint. boundary_ids: for "image" and "video", the token ids of the
    encoder's "start" / "end" / "sep" text (`from_tokenizer` tokenises them); image / video: the placeholder
    ids written in `input_ids`."""

    def __init__(
        self, config: NVILAConfig, boundary_ids: dict[str, dict[str, list[int]]], image: int, video: int,
        newline: list[int] | None = None,
    ) -> None:
        self.config = config
        self.boundary_ids = boundary_ids
        self.placeholder = {"image": image, "video": video}
        self.newline = list(newline or [])  # NVILA-Lite's literal "\n" after each tile, as text ids

    @classmethod
    def from_tokenizer(cls, config: NVILAConfig, tokenizer) -> "MediaLayout":
        from nvila_ft.model.tokenizer import MEDIA_TOKENS, encode  # deferred: transformers, not needed for counting

        boundary = {
            kind: {part: encode(tokenizer, text) if text else [] for part, text in (
                ("start", spec.start_tokens), ("end", spec.end_tokens), ("sep", spec.sep_tokens))}
            for kind, spec in (("image", config.image_encoder), ("video", config.video_encoder))
        }
        ids = tokenizer.convert_tokens_to_ids
        return cls(config, boundary, ids(MEDIA_TOKENS["image"]), ids(MEDIA_TOKENS["video"]), encode(tokenizer, "\n"))

    # ------------------------------------------------------------------ images
    @property
    def tokens_per_tile(self) -> int:
        return self.config.tokens_per_tile

    def tiles_image(self, tiled: bool) -> bool:
        """Whether an image is cut into several tiles (Dynamic-S2 or NVILA-Lite, when tiling applies)."""
        return tiled and self.config.image_aspect_ratio in ("dynamic_s2", "dynamic")

    def image(self, width: int, height: int, tiled: bool = True) -> ImagePlan:
        """The plan of one image; `tiled=False` is the single resized tile (multi-image prompts at inference)."""
        config, per_tile = self.config, self.tokens_per_tile
        ends = len(self.boundary_ids["image"]["start"]) + len(self.boundary_ids["image"]["end"])
        if self.tiles_image(tiled) and config.image_aspect_ratio == "dynamic_s2":
            grid = s2_grid(config, width, height)
            rows, cols = output_grid(config.s2_scales, grid, config.s2_resize_output_to_scale_idx)
            tokens = rows * cols * per_tile
            return ImagePlan(s2_tile_count(config.s2_scales, grid), grid, 1, tokens, tokens + ends)
        if self.tiles_image(tiled):
            grid = lite_grid(config, width, height)
            items = grid[0] * grid[1] + (1 if grid[0] * grid[1] > 1 else 0)  # + thumbnail
            return ImagePlan(items, grid, items, items * per_tile, items * (per_tile + ends + len(self.newline)))
        return ImagePlan(1, None, 1, per_tile, per_tile + ends)

    def image_item_tokens(self, grid: tuple[int, int] | None) -> int:
        """Feature tokens of one image item: a Dynamic-S2 item with its last-scale grid, or one tile (None)."""
        if grid is None:
            return self.tokens_per_tile
        rows, cols = output_grid(self.config.s2_scales, grid, self.config.s2_resize_output_to_scale_idx)
        return rows * cols * self.tokens_per_tile

    def image_run(self, grid: tuple[int, int] | None) -> list[int]:
        """The ids one image item takes in `input_ids`: start, placeholders, end."""
        ends = self.boundary_ids["image"]
        return ends["start"] + [self.placeholder["image"]] * self.image_item_tokens(grid) + ends["end"]

    # ------------------------------------------------------------------ videos
    def video_pools(self, frames: int) -> list[tuple[int, int]]:
        """(pooled frames, tokens per pooled frame) of a video, per pool size of TSP in order, or one entry
        (every frame, tokens per tile) for the per-frame encoder."""
        spec: EncoderSpec = self.config.video_encoder
        if spec.kind != "tsp_video":
            return [(frames, self.tokens_per_tile)]
        return temporal_pools(frames, math.isqrt(self.tokens_per_tile), spec.pool_sizes)

    def video_tokens(self, frames: int) -> int:
        """Feature tokens of a video (the placeholders the model fills)."""
        return sum(count * tokens for count, tokens in self.video_pools(frames))

    def video_run(self, frames: int) -> list[int]:
        """The ids one video takes in `input_ids`: per (pooled) frame start, placeholders, end; with TSP the
        separator after each pool size."""
        ends, placeholder = self.boundary_ids["video"], self.placeholder["video"]
        tsp = self.config.video_encoder.kind == "tsp_video"
        run: list[int] = []
        for count, tokens in self.video_pools(frames):
            run += (ends["start"] + [placeholder] * tokens + ends["end"]) * count
            run += ends["sep"] if tsp else []
        return run

    def video_positions(self, frames: int) -> int:
        return len(self.video_run(frames))
