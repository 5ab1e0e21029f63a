"""The media-feature path: SigLIP over every tile and frame -> Dynamic-S2 merge per image -> STC projector -> each
item's tokens in the order of its placeholders.

Images come in reading order, each a raster over its (merged) grid; videos frame by frame, or pooled group by
group (`nvila_ft.model.media_encoders`). All tiles and frames go through the tower and the projector in one call
each, so every process of a distributed run makes the same calls (a text-only batch runs one dummy tile,
returned as a zero term, whenever another process may run the tower: distributed training, or any distributed
step while ZeRO-3 shards the weights).
"""

from __future__ import annotations

import torch
from torch import nn

from nvila_ft.model.config import NVILAConfig
from nvila_ft.model.media_encoders import video_features
from nvila_ft.model.media_layout import output_grid, s2_tile_count
from nvila_ft.model.multiscale import merge_scales, merge_tiles, split_tiles, tokens_to_map
from nvila_ft.model.vision_tower import VisionTower


def encode_media(
    config: NVILAConfig,
    vision_tower: VisionTower,
    projector: nn.Module,
    pixel_values: torch.Tensor | None,
    image_grids: torch.Tensor | None,
    video_pixel_values: torch.Tensor | None,
    video_frame_counts: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(image features [image tokens, D], video features [video tokens, D], zero term of a dummy tile), in `device`
    and `dtype`; None for what the batch does not have."""
    image_tiles = 0 if pixel_values is None else pixel_values.shape[0]
    grids = [] if image_grids is None else [tuple(int(v) for v in g) for g in image_grids.tolist()]
    frame_counts = [] if video_frame_counts is None else [int(c) for c in video_frame_counts.tolist()]
    chunks = [t for t in (pixel_values, video_pixel_values) if t is not None and t.shape[0] > 0]
    dummy = not chunks
    if dummy:
        if not _must_run_the_tower():
            return None, None, None
        chunks = [torch.zeros(1, 3, config.tile_size, config.tile_size, device=device)]
    tower_dtype = vision_tower.transformer.embeddings.patch_embedding.weight.dtype
    features = vision_tower(torch.cat(chunks).to(tower_dtype))

    image_inputs, item_grids = _image_projector_inputs(config, features, grids, image_tiles)
    frames = features[image_tiles:]
    if sum(frame_counts) != (0 if dummy else frames.shape[0]):
        raise ValueError(f"video_frame_counts sum to {sum(frame_counts)} but video_pixel_values has {frames.shape[0]}")
    if config.dynamic_s2:
        frames = frames.repeat(1, 1, len(config.s2_scales))  # single-tile path: the one scale stands in for all

    projector_dtype = next(projector.parameters(), features).dtype
    projected = projector(torch.cat([*image_inputs, frames]).to(projector_dtype)).to(dtype)
    if dummy:
        return None, None, projected.sum() * 0.0
    images, image_tokens = _image_features(projected, item_grids)
    videos = [video_features(clip, config.video_encoder) for clip in projected[image_tokens:].split(frame_counts)]
    return images, (torch.cat(videos) if videos else None), None


def _image_projector_inputs(
    config: NVILAConfig, features: torch.Tensor, grids: list[tuple[int, int]], image_tiles: int
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Each image's projector input (Dynamic-S2: its scales merged on channels, split into the output scale's
    tiles) and the grid of those tiles; `grids` are (rows, cols) of the last scale, (0, 0) for a single tile."""
    scales = config.s2_scales
    inputs, item_grids, start = [], [], 0
    for grid in grids:
        tiled = grid != (0, 0)
        count = s2_tile_count(scales, grid) if (tiled and config.dynamic_s2) else 1
        if tiled and not config.dynamic_s2:
            raise ValueError(f"image grid {grid} given, but this model ({config.family}) takes single tiles")
        item = features[start : start + count]
        start += count
        if config.dynamic_s2:
            if tiled:
                merged = merge_scales(item, scales, grid, config.s2_resize_output_to_scale_idx)
                grid = output_grid(scales, grid, config.s2_resize_output_to_scale_idx)
            else:
                merged, grid = tokens_to_map(item).repeat(1, len(scales), 1, 1), (1, 1)
            item = split_tiles(merged, *grid).flatten(2).transpose(1, 2)
        else:
            grid = (1, 1)
        inputs.append(item)
        item_grids.append(grid)
    if start != image_tiles:
        raise ValueError(f"image_grids describe {start} tiles but pixel_values has {image_tiles}")
    return inputs, item_grids


def _image_features(projected: torch.Tensor, item_grids: list[tuple[int, int]]) -> tuple[torch.Tensor | None, int]:
    """The images' tokens ([tokens, D], each image a raster over its grid, or None) and how many projected tiles
    they took (the video frames follow)."""
    images, start = [], 0
    for rows, cols in item_grids:
        tiles = projected[start : start + rows * cols]
        start += rows * cols
        images.append(merge_tiles(tokens_to_map(tiles), rows, cols).flatten(2)[0].transpose(0, 1))
    return (torch.cat(images) if images else None), start


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _must_run_the_tower() -> bool:
    """Whether a batch without media still runs the vision tower (on a dummy tile): in distributed training
    (DDP / ZeRO synchronise every parameter's gradient) and in any distributed forward under ZeRO-3 (its
    parameter gathers are collectives every process must join)."""
    if _distributed_world_size() < 2:
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    return torch.is_grad_enabled() or is_deepspeed_zero3_enabled()
