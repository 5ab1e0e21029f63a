"""The scale-then-compress knobs of a checkpoint that can change without touching a weight: how many tiles an
image may take, how many frames a video gives, the Dynamic-S2 scales and the video's temporal pooling.

A run sets them as `model.<knob>=<value>` (sweepable with `-m`). They are checked against the checkpoint here,
written into the run's base `config.json`, and so read identically by the processor, the model, the planner and
every export (the served model sees what it was trained with).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from typing import Any

from nvila_ft.model.config import CheckpointError, NVILAConfig
from nvila_ft.model.media_layout import temporal_pools


@dataclass(kw_only=True)  # keyword-only: a subclass (ModelSource) keeps its own fields first in its signature
class ModelSettings:
    """The knobs a run may set, each None by default: the checkpoint's own value."""

    max_tiles: int | None = None
    min_tiles: int | None = None
    num_video_frames: int | None = None
    s2_scales: list[int] | None = None
    video_pool_sizes: list[list[int]] | None = None

    def settings(self) -> dict[str, Any]:
        """The knobs this run sets."""
        values = {key: getattr(self, key) for key in KNOBS}
        return {key: value for key, value in values.items() if value is not None}


KNOBS = tuple(field.name for field in fields(ModelSettings))


def with_settings(config: NVILAConfig, **settings: Any) -> NVILAConfig:
    """The configuration with the given knobs (None: the checkpoint's value); a value the architecture cannot
    take raises CheckpointError naming `model.<knob>` and the reason."""
    settings = {k: v for k, v in settings.items() if v is not None}
    unknown = set(settings) - set(KNOBS)
    if unknown:
        raise CheckpointError(f"unknown model setting(s) {sorted(unknown)}; settable: {', '.join(KNOBS)}")
    if not settings:
        return config
    raw = dict(config.raw)
    tiling = config.image_aspect_ratio in ("dynamic", "dynamic_s2")
    for key in ("max_tiles", "min_tiles"):
        if key in settings:
            if not tiling:
                raise CheckpointError(f"model.{key}: this checkpoint does not tile images (image_aspect_ratio "
                                      f"{config.image_aspect_ratio!r}); every image is one tile")
            raw[key] = _positive_int(settings[key], key)
    if "min_tiles" in settings and config.dynamic_s2:
        raise CheckpointError(f"model.min_tiles: Dynamic-S2 does not use it (an image takes at least the largest scale's grid, "
                              f"{config.s2_min_tiles} tiles at scales {config.s2_scales}); set model.max_tiles or model.s2_scales")
    if "num_video_frames" in settings:
        raw["num_video_frames"] = _positive_int(settings["num_video_frames"], "num_video_frames")
    if "s2_scales" in settings:
        raw["s2_scales"] = ",".join(str(s) for s in _s2_scales(config, settings["s2_scales"]))
    if "video_pool_sizes" in settings:
        raw["video_encoder"] = _video_encoder(config, settings["video_pool_sizes"])
    _check_tile_range(config, settings, raw)
    try:
        changed = replace(config, raw=raw)  # validates the whole configuration again
    except CheckpointError as err:
        named = ", ".join(f"model.{key} = {value!r}" for key, value in settings.items())
        raise CheckpointError(f"{named}: {err}") from None
    if changed.dynamic_s2 and changed.max_tiles < changed.s2_min_tiles:
        side = math.isqrt(changed.s2_min_tiles)
        raise CheckpointError(f"model.max_tiles = {changed.max_tiles}: Dynamic-S2 at scales {changed.s2_scales} needs at "
                              f"least {changed.s2_min_tiles} tiles (the largest scale's {side}x{side} grid)")
    _check_pools(changed, changed.num_video_frames)
    _check_fits_context(changed, settings)
    return changed


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"model.{key} = {value!r}: a whole number >= 1")
    return value


def _check_tile_range(config: NVILAConfig, settings: dict[str, Any], raw: dict[str, Any]) -> None:
    low, high = int(raw.get("min_tiles") or config.min_tiles), int(raw.get("max_tiles") or config.max_tiles)
    if low <= high:
        return
    if "min_tiles" in settings and "max_tiles" in settings:
        raise CheckpointError(f"model.min_tiles = {low} is above model.max_tiles = {high}: need min_tiles <= max_tiles")
    if "min_tiles" in settings:
        raise CheckpointError(f"model.min_tiles = {low} is above the checkpoint's max_tiles ({high}): need min_tiles <= "
                              f"max_tiles; lower it, or raise model.max_tiles too")
    raise CheckpointError(f"model.max_tiles = {high} is below the checkpoint's min_tiles ({low}): need min_tiles <= "
                          f"max_tiles; raise it, or lower model.min_tiles too")


def _check_fits_context(config: NVILAConfig, settings: dict[str, Any]) -> None:
    """An image of max_tiles tiles, and a video of num_video_frames frames, must fit the LLM's context (a larger
    figure is a typo, and would make every tiling search and frame sampling slower for nothing)."""
    if config.llm_context is None:
        return
    (key, context), per_tile = config.llm_context, config.tokens_per_tile
    limit = f"more than the LLM's context ({context:,}, llm/config.json `{key}`)"
    if "max_tiles" in settings and config.max_tiles * per_tile > context:
        raise CheckpointError(f"model.max_tiles = {config.max_tiles}: an image of that many tiles takes "
                              f"{config.max_tiles * per_tile:,} positions ({per_tile} a tile), {limit}; at most {context // per_tile}")
    if {"num_video_frames", "video_pool_sizes"} & set(settings):
        frames = config.num_video_frames
        pools = (temporal_pools(frames, math.isqrt(per_tile), config.video_encoder.pool_sizes)
                 if config.video_encoder.kind == "tsp_video" else [(frames, per_tile)])
        tokens = sum(count * size for count, size in pools)
        pooled = " after temporal pooling" if config.video_encoder.kind == "tsp_video" else f" ({per_tile} a frame)"
        if tokens > context:
            raise CheckpointError(f"model.num_video_frames = {frames}: a video of that many frames takes {tokens:,} positions"
                                  f"{pooled}, {limit}")


def _s2_scales(config: NVILAConfig, value: Any) -> list[int]:
    if not config.dynamic_s2:
        raise CheckpointError("model.s2_scales: this checkpoint has no Dynamic-S2 (its projector takes one scale)")
    try:
        scales = [int(s) for s in (value.split(",") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        raise CheckpointError(f"model.s2_scales = {value!r}: a list of whole numbers, e.g. [448,896,1344]") from None
    if len(scales) != len(config.s2_scales):
        raise CheckpointError(f"model.s2_scales = {scales}: the projector takes {len(config.s2_scales)} scales "
                              f"({config.mm_hidden_size} = {len(config.s2_scales)} x {config.vision_hidden_size} channels); "
                              f"the checkpoint's are {config.s2_scales}")
    if scales != sorted(set(scales)):
        raise CheckpointError(f"model.s2_scales = {scales}: scales must increase")
    tile = config.tile_size
    if scales[0] != tile or any(s % tile for s in scales):
        raise CheckpointError(f"model.s2_scales = {scales}: each scale must be a multiple of the smallest, which must be the "
                              f"vision tower's tile size ({tile}); the checkpoint's are {config.s2_scales}")
    return scales


def _video_encoder(config: NVILAConfig, value: Any) -> str:
    spec = config.video_encoder
    if spec.kind != "tsp_video":
        raise CheckpointError("model.video_pool_sizes: this checkpoint's video encoder does not pool in time "
                              "(only NVILA-Video's temporal-spatial pooling has pool sizes)")
    original = config.raw.get("video_encoder")
    encoder = json.loads(original) if isinstance(original, str) else dict(original)
    try:
        pools = [[int(v) for v in size] for size in value]
    except (TypeError, ValueError):
        pools = []
    if not pools or any(len(size) != 3 or min(size) < 1 for size in pools):
        raise CheckpointError(f"model.video_pool_sizes = {value!r}: a list of [t, h, w] of whole numbers >= 1, e.g. [[4,1,1]]")
    encoder["pool_sizes"] = pools
    return json.dumps(encoder) if isinstance(original, str) else encoder


def _check_pools(config: NVILAConfig, frames: int) -> None:
    if config.video_encoder.kind != "tsp_video":
        return
    try:
        temporal_pools(frames, math.isqrt(config.tokens_per_tile), config.video_encoder.pool_sizes)
    except ValueError as err:
        raise CheckpointError(f"model.num_video_frames / model.video_pool_sizes: {err}") from None
