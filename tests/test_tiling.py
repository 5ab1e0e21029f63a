"""Independent checks of image tiling and pixel normalisation against NVILA_SPEC.md §2.1-2.5, §2.12.

Expectations come from two places that do not use the code under test:
* the spec's literal tables (candidate order of §2.3, token/grid tables of §2.12), and
* small reference implementations written here (explicit loops over candidates and tile boxes), which
  follow the rule as the spec and the official `llava/mm_utils.py` (NVlabs/VILA@36f6adc) state it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from nvila_ft.data.pixels import PixelNormalizer
from nvila_ft.data.tiling import cut_grid, dynamic_s2_tiles, dynamic_tiles, pad_to_square
from nvila_ft.model.media_layout import candidate_grids, closest_grid, s2_tile_count
from tests.tolerances import U32

TILE = 448
SCALES = [448, 896, 1344]


# --------------------------------------------------------------------------- reference implementations
def ref_candidates(lo: int, hi: int) -> list[tuple[int, int]]:
    """(cols, rows) candidates: a Python set filled in the official comprehension's order, then a stable sort
    by tile count. The set's iteration order (deterministic for small-int tuples in CPython) decides ties."""
    pool: set[tuple[int, int]] = set()
    for n in range(lo, hi + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if lo <= cols * rows <= hi:
                    pool.add((cols, rows))
    ordered = list(pool)
    ordered.sort(key=lambda g: g[0] * g[1])
    return ordered


def ref_closest(width: int, height: int, lo: int, hi: int, tile: int) -> tuple[int, int]:
    """(cols, rows) by the §2.2 rule: first strictly closer aspect wins; exact ties go to the later candidate
    only when the image area exceeds half the candidate's pixel budget."""
    aspect = width / height
    chosen = (1, 1)
    best = float("inf")
    for cols, rows in ref_candidates(lo, hi):
        gap = abs(aspect - cols / rows)
        if gap < best:
            chosen, best = (cols, rows), gap
        elif gap == best and width * height > 0.5 * tile * tile * cols * rows:
            chosen = (cols, rows)
    return chosen


def ref_grid_tiles(image: Image.Image, cols: int, rows: int, tile: int) -> list[Image.Image]:
    """Resize to cols*tile x rows*tile with PIL's default filter, then crop tile t at (t % cols, t // cols)."""
    big = image.resize((cols * tile, rows * tile))
    out = []
    for t in range(cols * rows):
        x0, y0 = (t % cols) * tile, (t // cols) * tile
        out.append(big.crop((x0, y0, x0 + tile, y0 + tile)))
    return out


def ref_s2_tiles(image: Image.Image, scales: list[int], max_tiles: int = 12):
    tile = scales[0]
    tiles = []
    for scale in scales[:-1]:
        side = scale // tile
        tiles += ref_grid_tiles(image, side, side, tile)
    cols, rows = ref_closest(*image.size, (scales[-1] // tile) ** 2, max_tiles, tile)
    tiles += ref_grid_tiles(image, cols, rows, tile)
    return tiles, (rows, cols)


def ramp_image(width: int, height: int) -> Image.Image:
    """R encodes the normalised x position, G the normalised y position, B is constant."""
    x = (np.arange(width) + 0.5) / width * 255.0
    y = (np.arange(height) + 0.5) / height * 255.0
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.round(x)[None, :]
    arr[..., 1] = np.round(y)[:, None]
    arr[..., 2] = 77
    return Image.fromarray(arr, "RGB")


def tile_means(tile: Image.Image) -> tuple[float, float]:
    arr = np.asarray(tile, dtype=np.float64)
    return arr[..., 0].mean(), arr[..., 1].mean()


def assert_region(tile: Image.Image, col: int, cols: int, row: int, rows: int, tol: float = 2.5) -> None:
    """The tile shows the (col, row) cell of a cols x rows split of the *whole* image."""
    r, g = tile_means(tile)
    assert abs(r - 255.0 * (col + 0.5) / cols) < tol, (r, col, cols)
    assert abs(g - 255.0 * (row + 0.5) / rows) < tol, (g, row, rows)


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def solid(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), (200, 30, 90))


# --------------------------------------------------------------------------- candidates
SPEC_9_12 = [(3, 3), (9, 1), (1, 9), (10, 1), (1, 10), (2, 5), (5, 2), (11, 1), (1, 11), (1, 12), (6, 2), (12, 1), (3, 4), (4, 3), (2, 6)]


def test_candidates_9_12_match_spec_list_in_order():
    assert candidate_grids(9, 12) == SPEC_9_12
    assert ref_candidates(9, 12) == SPEC_9_12


def test_candidates_1_12_match_reference_in_order():
    expected = ref_candidates(1, 12)
    assert candidate_grids(1, 12) == expected
    # Sanity on the reference itself: all 35 pairs with 1 <= c*r <= 12, sorted by product.
    assert len(expected) == 35
    assert [c * r for c, r in expected] == sorted(c * r for c, r in expected)
    assert set(expected) == {(c, r) for c in range(1, 13) for r in range(1, 13) if c * r <= 12}


@pytest.mark.parametrize("lo,hi", [(1, 6), (4, 4), (4, 12), (9, 9), (16, 30), (1, 40), (1, 100), (7, 90), (30, 31)])
def test_candidates_other_bounds(lo, hi):
    assert candidate_grids(lo, hi) == ref_candidates(lo, hi)


# --------------------------------------------------------------------------- spec §2.12 tables
# (W, H) -> (rows, cols) of the Dynamic-S2 largest scale, tiles through SigLIP, LLM positions (2x2 STC: 256/tile + "\n").
S2_TABLE = {
    (448, 448): ((3, 3), 14, 2305),
    (1344, 896): ((3, 4), 17, 3073),
    (896, 1344): ((4, 3), 17, 3073),
    (1920, 1080): ((3, 4), 17, 3073),
    (640, 480): ((3, 4), 17, 3073),
    (3000, 500): ((2, 6), 17, 3073),
    (500, 3000): ((9, 1), 14, 2305),
}


@pytest.mark.parametrize("size", list(S2_TABLE))
def test_dynamic_s2_spec_table(size):
    grid, n_tiles, positions = S2_TABLE[size]
    w, h = size
    # the reference rule agrees with the spec table
    cols, rows = ref_closest(w, h, 9, 12, TILE)
    assert (rows, cols) == grid
    assert 1 + 4 + rows * cols == n_tiles
    assert rows * cols * 256 + 1 == positions
    # the code agrees with both
    assert closest_grid(w, h, candidate_grids(9, 12), TILE) == (cols, rows)
    tiled = dynamic_s2_tiles(solid(w, h), SCALES, max_tiles=12)
    assert tiled.grid == grid
    assert len(tiled.tiles) == n_tiles
    assert all(t.size == (TILE, TILE) for t in tiled.tiles)
    assert s2_tile_count(SCALES, tiled.grid) == n_tiles


# (W, H) -> tiles through SigLIP (incl. thumbnail), (cols, rows) of the grid
LITE_TABLE = {
    (448, 448): (1, (1, 1)),
    (1344, 896): (7, (3, 2)),
    (1000, 1000): (10, (3, 3)),
    (640, 480): (13, (4, 3)),
}


@pytest.mark.parametrize("size", list(LITE_TABLE))
def test_lite_spec_table(size):
    n_tiles, (cols, rows) = LITE_TABLE[size]
    w, h = size
    assert ref_closest(w, h, 1, 12, TILE) == (cols, rows)
    assert cols * rows + (1 if cols * rows > 1 else 0) == n_tiles
    assert closest_grid(w, h, candidate_grids(1, 12), TILE) == (cols, rows)
    tiled = dynamic_tiles(solid(w, h), TILE, 1, 12)
    assert len(tiled.tiles) == n_tiles
    assert tiled.grid is None
    assert all(t.size == (TILE, TILE) for t in tiled.tiles)
    # spec: 7 <image> items of 121+1 embeddings plus 7 literal "\n" tokens -> 861 positions for 1344x896
    if size == (1344, 896):
        assert n_tiles * (121 + 1) + n_tiles == 861


def test_lite_no_thumbnail_flag():
    tiled = dynamic_tiles(solid(1344, 896), TILE, 1, 12, thumbnail=False)
    assert len(tiled.tiles) == 6


# --------------------------------------------------------------------------- tie-break edge cases
@pytest.mark.parametrize(
    "size,expected",
    [
        ((3000, 500), (6, 2)),  # aspect 6 ties (9,1) and (6,2); area 1.5e6 > 0.5*448^2*12 -> (6,2)
        ((2688, 448), (9, 1)),  # area == 0.5*448^2*12 exactly: not strictly greater -> keep (9,1)
        ((2694, 449), (6, 2)),  # just above the threshold
        ((2400, 400), (9, 1)),  # below the threshold
    ],
)
def test_tie_break_threshold_s2(size, expected):
    assert ref_closest(*size, 9, 12, TILE) == expected
    assert closest_grid(*size, candidate_grids(9, 12), TILE) == expected


@pytest.mark.parametrize(
    "size,expected",
    [
        ((448, 448), (1, 1)),  # 448^2 is not > 0.5*448^2*4
        ((634, 634), (2, 2)),  # 634^2 = 401956 > 401408
        ((633, 633), (1, 1)),  # 400689 < 401408
        ((951, 951), (3, 3)),  # 904401 > 903168
        ((950, 950), (2, 2)),
    ],
)
def test_tie_break_threshold_lite(size, expected):
    assert ref_closest(*size, 1, 12, TILE) == expected
    assert closest_grid(*size, candidate_grids(1, 12), TILE) == expected


# --------------------------------------------------------------------------- random sweep
def _random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(count):
        aspect = math.exp(rng.uniform(-3.0, 3.0))
        area = math.exp(rng.uniform(7.0, 16.0))
        w = max(1, int(round((area * aspect) ** 0.5)))
        h = max(1, int(round((area / aspect) ** 0.5)))
        sizes.append((w, h))
    # sizes with exact candidate aspect ratios, where ties happen
    for cols in range(1, 13):
        for rows in range(1, 13):
            for unit in (7, 32, 64, 150, 224, 300, 448, 500):
                sizes.append((cols * unit, rows * unit))
    return sizes


@pytest.mark.parametrize("lo,hi", [(1, 12), (9, 12), (4, 12), (1, 6)])
@pytest.mark.parametrize("tile", [448, 32, 384])
def test_closest_grid_random_sweep(lo, hi, tile):
    grids = candidate_grids(lo, hi)
    mismatches = []
    for w, h in _random_sizes(1500, seed=lo * 100 + hi + tile):
        got = closest_grid(w, h, grids, tile)
        want = ref_closest(w, h, lo, hi, tile)
        if got != want:
            mismatches.append(((w, h), got, want))
    assert not mismatches, mismatches[:10]


def test_dynamic_s2_grid_random_images():
    rng = random.Random(5)
    for _ in range(12):
        w, h = rng.randint(20, 2500), rng.randint(20, 2500)
        img = solid(w, h)
        tiled = dynamic_s2_tiles(img, SCALES, 12)
        cols, rows = ref_closest(w, h, 9, 12, TILE)
        assert tiled.grid == (rows, cols)
        assert len(tiled.tiles) == 5 + rows * cols


# --------------------------------------------------------------------------- tile content & order
def test_cut_grid_row_major_exact():
    img = ramp_image(700, 500)
    got = cut_grid(img, 4, 3, TILE)
    want = ref_grid_tiles(img, 4, 3, TILE)
    assert len(got) == 12
    for t, (a, b) in enumerate(zip(got, want)):
        assert same_pixels(a, b), t
        assert_region(a, t % 4, 4, t // 4, 3)


@pytest.mark.parametrize("size", [(1344, 896), (1920, 1080), (500, 3000), (3000, 500), (448, 448), (1000, 1000)])
def test_lite_tiles_order_and_thumbnail(size):
    img = ramp_image(*size)
    cols, rows = ref_closest(*size, 1, 12, TILE)
    tiled = dynamic_tiles(img, TILE, 1, 12)
    grid_tiles = ref_grid_tiles(img, cols, rows, TILE)
    expected = grid_tiles + ([img.resize((TILE, TILE))] if cols * rows > 1 else [])
    assert len(tiled.tiles) == len(expected)
    for t, (a, b) in enumerate(zip(tiled.tiles, expected)):
        assert same_pixels(a, b), t
    for t in range(cols * rows):
        assert_region(tiled.tiles[t], t % cols, cols, t // cols, rows)
    if cols * rows > 1:
        # thumbnail last: the whole image squashed to one tile
        thumb = tiled.tiles[-1]
        assert_region(thumb, 0, 1, 0, 1)
        arr = np.asarray(thumb, dtype=np.float64)
        assert arr[:, :, 0].mean(axis=0)[0] < 10 and arr[:, :, 0].mean(axis=0)[-1] > 245
        assert arr[:, :, 1].mean(axis=1)[0] < 10 and arr[:, :, 1].mean(axis=1)[-1] > 245


@pytest.mark.parametrize("size", [(1344, 896), (896, 1344), (3000, 500), (500, 3000), (640, 480)])
def test_dynamic_s2_tile_order_and_content(size):
    img = ramp_image(*size)
    tiled = dynamic_s2_tiles(img, SCALES, 12)
    want, grid = ref_s2_tiles(img, SCALES, 12)
    assert tiled.grid == grid
    assert len(tiled.tiles) == len(want)
    for t, (a, b) in enumerate(zip(tiled.tiles, want)):
        assert same_pixels(a, b), t
    rows, cols = grid
    # [448 tile]: whole image squashed
    assert_region(tiled.tiles[0], 0, 1, 0, 1)
    # [4 tiles at 896]: a square 2x2 split of the whole image, aspect NOT kept
    for t in range(4):
        assert_region(tiled.tiles[1 + t], t % 2, 2, t // 2, 2)
    # the 896 scale is a square resize: its tiles equal crops of image.resize((896, 896))
    square = img.resize((896, 896))
    for t in range(4):
        x0, y0 = (t % 2) * TILE, (t // 2) * TILE
        assert same_pixels(tiled.tiles[1 + t], square.crop((x0, y0, x0 + TILE, y0 + TILE)))
    # [grid tiles at 1344-ish]: row-major over the aspect-matched grid
    for t in range(rows * cols):
        assert_region(tiled.tiles[5 + t], t % cols, cols, t // cols, rows)


def test_dynamic_s2_first_tile_is_whole_image_resized():
    img = ramp_image(1920, 1080)
    tiled = dynamic_s2_tiles(img, SCALES, 12)
    assert same_pixels(tiled.tiles[0], img.resize((TILE, TILE)))


# --------------------------------------------------------------------------- tiny preset (tile 32, scales 32/64/96)
def test_tiny_preset_config_values():
    from nvila_ft.model.presets import preset_config

    s2 = preset_config("nvila-8b-tiny")
    assert s2.s2_scales == [32, 64, 96]
    assert s2.tile_size == 32
    assert s2.max_tiles == 12
    lite = preset_config("nvila-lite-tiny")
    assert lite.tile_size == 32
    assert (lite.min_tiles, lite.max_tiles) == (1, 12)


TINY_S2 = {
    (32, 32): (3, 3),
    (96, 64): (3, 4),
    (64, 96): (4, 3),
    (137, 77): (3, 4),
    (40, 30): (3, 4),
    (216, 36): (2, 6),  # tie (9,1)/(6,2); area 7776 > 0.5*32^2*12 = 6144
    (192, 32): (1, 9),  # tie, area 6144 == threshold -> stays (9,1) cols x rows
    (36, 216): (9, 1),  # aspect 1/6: (1,9) is closest (|1/6-1/9|), no tie
    (20, 200): (10, 1),
}


@pytest.mark.parametrize("size", list(TINY_S2))
def test_tiny_s2_grids(size):
    from nvila_ft.model.presets import preset_config

    config = preset_config("nvila-8b-tiny")
    scales, tile = config.s2_scales, config.tile_size
    cols, rows = ref_closest(*size, 9, config.max_tiles, tile)
    assert (rows, cols) == TINY_S2[size]
    img = ramp_image(*size)
    tiled = dynamic_s2_tiles(img, scales, config.max_tiles)
    assert tiled.grid == (rows, cols)
    want, _ = ref_s2_tiles(img, scales, config.max_tiles)
    assert len(tiled.tiles) == 5 + rows * cols == s2_tile_count(scales, tiled.grid)
    for a, b in zip(tiled.tiles, want):
        assert a.size == (tile, tile)
        assert same_pixels(a, b)


@pytest.mark.parametrize("size,n_tiles", [((32, 32), 1), ((96, 64), 7), ((72, 72), 10), ((40, 30), 13), ((46, 46), 5)])
def test_tiny_lite_tiles(size, n_tiles):
    # 72x72: ties (1,1),(2,2),(3,3); 5184 > 0.5*1024*9=4608 -> 3x3. 46x46: 2116 > 2048 -> 2x2 but < 4608.
    img = ramp_image(*size)
    cols, rows = ref_closest(*size, 1, 12, 32)
    assert cols * rows + (cols * rows > 1) == n_tiles
    tiled = dynamic_tiles(img, 32, 1, 12)
    assert len(tiled.tiles) == n_tiles
    expected = ref_grid_tiles(img, cols, rows, 32) + ([img.resize((32, 32))] if n_tiles > 1 else [])
    for a, b in zip(tiled.tiles, expected):
        assert same_pixels(a, b)


# --------------------------------------------------------------------------- pad mode
def test_pad_fill_is_truncated_mean():
    assert PixelNormalizer(448).pad_fill == (127, 127, 127)
    assert PixelNormalizer(448, mean=(0.48145466, 0.4578275, 0.40821073)).pad_fill == (122, 116, 104)


@pytest.mark.parametrize("size", [(10, 7), (7, 10), (9, 4), (4, 9), (100, 37), (5, 5)])
def test_pad_to_square_offsets_and_fill(size):
    w, h = size
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    fill = PixelNormalizer(448).pad_fill
    out = pad_to_square(img, fill)
    side = max(w, h)
    assert out.size == (side, side)
    # official expand2square: wide -> paste at (0, (w-h)//2); tall -> ((h-w)//2, 0)
    if w > h:
        ox, oy = 0, (w - h) // 2
    elif h > w:
        ox, oy = (h - w) // 2, 0
    else:
        ox = oy = 0
    expected = np.empty((side, side, 3), dtype=np.uint8)
    expected[...] = np.array([127, 127, 127], dtype=np.uint8)
    expected[oy : oy + h, ox : ox + w] = arr
    assert np.array_equal(np.asarray(out), expected)


# --------------------------------------------------------------------------- pixel normalisation
def _siglip_processor(size: int):
    try:
        from transformers import SiglipImageProcessor
    except Exception as e:  # pragma: no cover - environment dependent
        pytest.skip(f"SiglipImageProcessor not importable: {e}")
    return SiglipImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


@pytest.mark.parametrize("tile", [448, 32])
@pytest.mark.parametrize("size", [(448, 448), (640, 480), (37, 100), (1000, 1000), (449, 447), (32, 32), (3, 700)])
def test_pixel_normalizer_matches_siglip_processor(tile, size):
    proc = _siglip_processor(tile)
    rng = np.random.default_rng(size[0] * 7 + size[1] + tile)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    ours = PixelNormalizer(tile)(img)
    theirs = torch.as_tensor(np.asarray(proc(images=img, return_tensors="np")["pixel_values"][0]))
    assert ours.shape == (3, tile, tile)
    assert ours.dtype == torch.float32
    assert theirs.shape == ours.shape
    # the same resize on uint8; (x/255 - 0.5)/0.5 on values <= 1: the cast to float32 (u) and the subtraction (u/2),
    # doubled by / 0.5: <= 3 u32 from the exact value on each side, so 6 u32 apart
    assert (ours - theirs.float()).abs().max().item() <= 6 * U32


def test_pixel_normalizer_values_and_from_config():
    from nvila_ft.model.presets import preset_config

    pre = preset_config("nvila-8b").preprocessor
    norm = PixelNormalizer.from_preprocessor_config(pre, 448)
    assert norm.size == 448 and norm.resample == Image.Resampling.BICUBIC
    assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.5, 0.5, 0.5)
    arr = np.zeros((448, 448, 3), dtype=np.uint8)
    arr[0, 0] = (0, 255, 128)
    out = norm(Image.fromarray(arr, "RGB"))
    # already 448x448: no resize; x/255 then (x-0.5)/0.5, CHW
    assert out[0, 0, 0].item() == -1.0
    assert out[1, 0, 0].item() == 1.0
    # 128/255 rounded to float32 on both sides (u32 x 128/255 each), then - 0.5 (exact) and / 0.5 (exact, doubling)
    assert abs(out[2, 0, 0].item() - (np.float32(128 / 255) - 0.5) / 0.5) <= 4 * U32 * 128 / 255
    assert out[:, 1:, :].eq(-1.0).all()
