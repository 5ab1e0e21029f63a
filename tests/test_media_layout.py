"""The media layout module against the spec's token table (§2.12), at real and tiny sizes, from sizes alone."""

from __future__ import annotations

import pytest

from nvila_ft.model.media_layout import MediaLayout
from nvila_ft.model.presets import preset_config
from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
from nvila_ft.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def layouts():
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)  # "\n" is one token, as in Qwen2's vocabulary
    names = ("nvila-8b", "nvila-lite-2b", "nvila-8b-video", "nvila-8b-tiny", "nvila-lite-tiny", "nvila-video-tiny")
    return {name: MediaLayout.from_tokenizer(preset_config(name), tokenizer) for name in names}


@pytest.mark.parametrize(
    ("name", "size", "tiles", "grid", "positions"),
    [
        ("nvila-8b", (448, 448), 14, (3, 3), 9 * 256 + 1),
        ("nvila-8b", (1344, 896), 17, (3, 4), 12 * 256 + 1),
        ("nvila-8b", (896, 1344), 17, (4, 3), 3073),
        ("nvila-8b", (1920, 1080), 17, (3, 4), 3073),
        ("nvila-8b", (3000, 500), 17, (2, 6), 3073),
        ("nvila-8b", (500, 3000), 14, (9, 1), 2305),
        ("nvila-lite-2b", (448, 448), 1, (1, 1), 121 + 1 + 1),  # no thumbnail for one tile; + the literal "\n"
        ("nvila-lite-2b", (1344, 896), 7, (2, 3), 7 * (121 + 1) + 7),  # 3 columns x 2 rows + thumbnail
        ("nvila-lite-2b", (1000, 1000), 10, (3, 3), 10 * 123),
        ("nvila-lite-2b", (640, 480), 13, (3, 4), 13 * 123),
        ("nvila-8b-video", (1344, 896), 1, None, 257),  # resize mode: one tile
        ("nvila-8b-tiny", (64, 64), 14, (3, 3), 9 * 4 + 1),  # 32 px tiles, 8 px patches, 2x2 STC: 4 tokens a tile
        ("nvila-lite-tiny", (96, 64), 7, (2, 3), 7 * (4 + 1) + 7),  # 4x4 patches padded to 6x6, 3x3 STC: 2x2
    ],
)
def test_images_match_the_spec_table(layouts, name, size, tiles, grid, positions):
    plan = layouts[name].image(*size)
    assert (plan.tiles, plan.grid, plan.positions) == (tiles, grid, positions)


def test_runs_are_placeholders_between_boundary_ids(layouts):
    layout = layouts["nvila-8b"]
    newline = layout.boundary_ids["image"]["end"]
    assert len(newline) == 1 and layout.boundary_ids["image"]["start"] == []
    run = layout.image_run((3, 4))
    assert run == [layout.placeholder["image"]] * 3072 + newline
    assert layout.image(1344, 896, tiled=False).positions == len(layout.image_run(None)) == 257  # multi-image prompts


@pytest.mark.parametrize(
    ("name", "counts"),
    [("nvila-8b", (2056, 8224, 65792)), ("nvila-8b-video", (257, 1028, 8224)), ("nvila-lite-2b", (976, 3904, 31232))],
)
def test_videos_match_the_spec_table(layouts, name, counts):
    layout = layouts[name]
    assert tuple(layout.video_positions(t) for t in (8, 32, 256)) == counts
    assert tuple(len(layout.video_run(t)) for t in (8, 32, 256)) == counts


def test_tsp_pooling_needs_divisible_frames(layouts):
    layout = layouts["nvila-video-tiny"]
    assert layout.video_pools(16) == [(2, 4)] and layout.video_tokens(16) == 8
    assert layout.video_run(16) == ([layout.placeholder["video"]] * 4 + layout.boundary_ids["video"]["end"]) * 2
    with pytest.raises(ValueError, match=r"frame count \(12\) divisible by 8"):
        layout.video_pools(12)


def test_tsp_pools_that_are_not_square_count_what_the_encoder_pools():
    """A [t, h, w] pool with h != w: frames / t pooled frames of (side / h) x (side / w) tokens, as many as the
    video encoder's pooling gives; each axis must divide."""
    import torch

    from nvila_ft.model.media_encoders import temporal_spatial_pool
    from nvila_ft.model.media_layout import temporal_pools

    pools = ((2, 2, 1), (8, 1, 4))
    assert temporal_pools(8, 4, pools) == [(4, 2 * 4), (1, 4 * 1)]  # side 4: 2x4 tokens, then 4x1
    assert temporal_spatial_pool(torch.zeros(8, 16, 3), pools).shape[0] == 4 * 8 + 1 * 4
    for bad in ((1, 1, 3), (1, 3, 1), (3, 1, 1)):
        with pytest.raises(ValueError, match="divisible"):
            temporal_pools(8, 4, (bad,))
