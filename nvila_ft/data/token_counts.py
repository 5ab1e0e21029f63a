"""How many vision-tower tiles and LLM positions an image or video takes, from sizes alone (no pixels, no model)."""

from __future__ import annotations

from dataclasses import dataclass

from nvila_ft.data.tiling import candidate_grids, closest_grid, s2_tile_count
from nvila_ft.model.config import NVILAConfig
from nvila_ft.model.media_encoders import video_length
from nvila_ft.model.multiscale import output_grid


@dataclass(frozen=True)
class MediaCost:
    tiles: int  # tiles (or frames) through SigLIP
    positions: int  # LLM positions, including end tokens and NVILA-Lite's literal "\n" after each tile
    grid: tuple[int, int] | None = None  # (rows, cols) of the tile grid, when tiled


def image_cost(config: NVILAConfig, width: int, height: int, tile: bool = True, end_tokens: int = 1) -> MediaCost:
    """Cost of one image; `tile=False` is the single-resized-tile path (e.g. multi-image prompts at inference)."""
    per_tile = config.tokens_per_tile
    mode = config.image_aspect_ratio
    if tile and mode == "dynamic_s2":
        scales = config.s2_scales
        cols, rows = closest_grid(width, height, candidate_grids((scales[-1] // scales[0]) ** 2, config.max_tiles), scales[0])
        out_rows, out_cols = output_grid(scales, (rows, cols), config.s2_resize_output_to_scale_idx)
        return MediaCost(s2_tile_count(scales, (rows, cols)), out_rows * out_cols * per_tile + end_tokens, (rows, cols))
    if tile and mode == "dynamic":
        cols, rows = closest_grid(width, height, candidate_grids(config.min_tiles, config.max_tiles), config.tile_size)
        count = rows * cols + (1 if rows * cols > 1 else 0)  # + thumbnail
        return MediaCost(count, count * (per_tile + end_tokens + 1), (rows, cols))
    return MediaCost(1, per_tile + end_tokens)


def video_cost(config: NVILAConfig, frames: int | None = None, end_tokens: int = 1) -> MediaCost:
    frames = frames or config.num_video_frames
    positions = video_length(config.video_encoder, frames, config.tokens_per_tile, {"end": end_tokens})
    return MediaCost(frames, positions)
