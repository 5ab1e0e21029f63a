"""Independent checks of STC, the projector layouts, the Dynamic-S2 multi-scale merge and the key names/shapes of
the full-size presets, against NVILA_SPEC.md §1.3-1.5, §2.3, §2.7.

References here are written from the spec (explicit loops over windows/tiles, the adaptive-pool bin rule) and from
the official view/permute sequence of NVlabs/VILA@36f6adc llava/model/multimodal_projector/base_projector.py,
re-expressed independently.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvila_ft.model import multiscale
from nvila_ft.model.media_layout import output_grid
from nvila_ft.model.multiscale import merge_scales, merge_tiles, split_tiles, tokens_to_map
from nvila_ft.model.projector import MultimodalProjector, SpatialToChannel, build_projector_layers
from tests.tolerances import reordered, scale_of


# --------------------------------------------------------------------------- references
def stc_loop(x: torch.Tensor, k: int) -> torch.Tensor:
    """Spec §2.7 by explicit loops: pad bottom/right with zeros to a multiple of k; output token (I, J) in raster
    order over the padded grid; channels = concat over the k x k window, row-major, one C-slice per position."""
    b, n_tok, c = x.shape
    n = math.isqrt(n_tok)
    assert n * n == n_tok
    m = -(-n // k)
    out = torch.zeros(b, m * m, k * k * c, dtype=x.dtype)
    for i in range(m):
        for j in range(m):
            for dr in range(k):
                for dc in range(k):
                    r, col = k * i + dr, k * j + dc
                    if r < n and col < n:
                        slot = dr * k + dc
                        out[:, i * m + j, slot * c : (slot + 1) * c] = x[:, r * n + col, :]
    return out


def stc_official_style(x: torch.Tensor, k: int) -> torch.Tensor:
    """The original two-step view/permute sequence (rows padded first, then columns; fold column pairs into
    channels, swap, fold row pairs, swap back) — written from its description, not copied."""
    b, n_tok, c = x.shape
    side = int(n_tok**0.5)
    g = x.reshape(b, side, side, c)
    if side % k:
        extra = k - side % k
        g = torch.cat([g, g.new_zeros(b, extra, g.shape[2], c)], dim=1)  # bottom rows
        g = torch.cat([g, g.new_zeros(b, g.shape[1], extra, c)], dim=2)  # right columns
    rows, cols = g.shape[1], g.shape[2]
    g = g.contiguous().view(b, rows, cols // k, k * c)  # k neighbouring columns -> channels
    g = g.permute(0, 2, 1, 3).contiguous()  # [b, cols/k, rows, k*c]
    g = g.view(b, cols // k, rows // k, k * k * c)  # k neighbouring rows -> channels
    g = g.permute(0, 2, 1, 3).contiguous()  # [b, rows/k, cols/k, k*k*c]
    return g.reshape(b, -1, k * k * c)


def chessboard_merge_loop(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """tile (i*cols + j) goes to grid row i, column j."""
    n, c, h, w = tiles.shape
    out = torch.empty(1, c, rows * h, cols * w, dtype=tiles.dtype)
    for i in range(rows):
        for j in range(cols):
            out[0, :, i * h : (i + 1) * h, j * w : (j + 1) * w] = tiles[i * cols + j]
    return out


def raster_map_loop(tokens: torch.Tensor) -> torch.Tensor:
    """[n, s*s, C] -> [n, C, s, s], token p at row p // s, column p % s."""
    n, length, c = tokens.shape
    s = math.isqrt(length)
    out = torch.empty(n, c, s, s, dtype=tokens.dtype)
    for p in range(length):
        out[:, :, p // s, p % s] = tokens[:, p, :]
    return out


def area_bins(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """Adaptive-pool bins: start = floor(i*in/out), end = ceil((i+1)*in/out)."""
    return [((i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)) for i in range(n_out)]


def area_resize_loop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area resize of [1, C, H, W] by explicit per-axis bin averaging (separable), in float64."""
    x = x.double()
    _, c, h, w = x.shape
    rows = torch.stack([x[0, :, s:e, :].mean(dim=1) for s, e in area_bins(h, size[0])], dim=1)
    cols = torch.stack([rows[:, :, s:e].mean(dim=2) for s, e in area_bins(w, size[1])], dim=2)
    return cols.unsqueeze(0)


def rep_index(n_in: int, factor: int) -> torch.Tensor:
    return torch.tensor([i // factor for i in range(n_in * factor)])


def upsample_1_5(v: torch.Tensor, dim: int) -> torch.Tensor:
    """64 -> 96 along `dim`: [x0, (x0+x1)/2, x1, x2, (x2+x3)/2, x3, ...] (spec §2.3)."""
    n = v.shape[dim]
    pieces = []
    for p in range(0, n, 2):
        a, b = v.select(dim, p), v.select(dim, p + 1)
        pieces += [a, (a + b) / 2, b]
    return torch.stack(pieces, dim=dim)


# --------------------------------------------------------------------------- STC
@pytest.mark.parametrize("k,n", [(2, 4), (2, 5), (2, 6), (2, 7), (2, 32), (2, 1), (3, 4), (3, 6), (3, 7), (3, 32), (3, 5), (3, 2)])
def test_stc_matches_loop_reference(k, n):
    torch.manual_seed(k * 100 + n)
    x = torch.randn(2, n * n, 5)
    out = SpatialToChannel(k)(x)
    m = -(-n // k)
    assert out.shape == (2, m * m, k * k * 5)
    torch.testing.assert_close(out, stc_loop(x, k), rtol=0, atol=0)  # data movement only (no arithmetic): bit-identical


@pytest.mark.parametrize("k,n", [(2, 4), (2, 5), (2, 7), (2, 32), (3, 4), (3, 6), (3, 7), (3, 32), (3, 8)])
def test_stc_matches_official_view_permute_sequence(k, n):
    torch.manual_seed(7 * k + n)
    x = torch.randn(3, n * n, 4)
    ref = stc_official_style(x, k)
    torch.testing.assert_close(SpatialToChannel(k)(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(stc_loop(x, k), ref, rtol=0, atol=0)


def test_stc_index_pattern_explicit():
    # 3x3 grid, k=2: padded to 4x4; token value = its grid index + 1 (0 marks padding)
    x = (torch.arange(9, dtype=torch.float32) + 1).reshape(1, 9, 1)
    out = SpatialToChannel(2)(x)[0, :, :].tolist()
    assert out == [[1, 2, 4, 5], [3, 0, 6, 0], [7, 8, 0, 0], [9, 0, 0, 0]]
    # 4x4 grid, k=3: padded to 6x6 (2 rows at the bottom, 2 cols at the right)
    x = (torch.arange(16, dtype=torch.float32) + 1).reshape(1, 16, 1)
    out = SpatialToChannel(3)(x)[0].tolist()
    assert out == [
        [1, 2, 3, 5, 6, 7, 9, 10, 11],
        [4, 0, 0, 8, 0, 0, 12, 0, 0],
        [13, 14, 15, 0, 0, 0, 0, 0, 0],
        [16, 0, 0, 0, 0, 0, 0, 0, 0],
    ]


def test_stc_contiguous_channel_slices():
    # C=2: each window position contributes a contiguous pair (not interleaved channel-major)
    x = torch.zeros(1, 4, 2)
    for p in range(4):
        x[0, p, 0], x[0, p, 1] = 10 * p, 10 * p + 1
    assert SpatialToChannel(2)(x)[0, 0].tolist() == [0, 1, 10, 11, 20, 21, 30, 31]


def test_stc_token_counts_32x32():
    x = torch.randn(1, 1024, 2)
    assert SpatialToChannel(2)(x).shape == (1, 256, 8)
    assert SpatialToChannel(3)(x).shape == (1, 121, 18)


# --------------------------------------------------------------------------- projector layouts
def _layout(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_layout_mlp_downsample_2x2():
    c, d = 12, 20
    for kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        layers = build_projector_layers(kind, c, d)
        assert isinstance(layers, nn.Sequential) and len(layers) == 5
        assert isinstance(layers[0], SpatialToChannel) and layers[0].factor == 2
        assert isinstance(layers[1], nn.LayerNorm) and layers[1].eps == 1e-5
        assert isinstance(layers[3], nn.GELU) and layers[3].approximate == "none"
        assert isinstance(layers[2], nn.Linear) and isinstance(layers[4], nn.Linear)
        assert _layout(layers) == {
            "1.weight": (4 * c,), "1.bias": (4 * c,),
            "2.weight": (d, 4 * c), "2.bias": (d,),
            "4.weight": (d, d), "4.bias": (d,),
        }


def test_layout_mlp_downsample_3x3_fix():
    c, d = 12, 20
    layers = build_projector_layers("mlp_downsample_3x3_fix", c, d)
    assert isinstance(layers, nn.Sequential) and len(layers) == 8
    assert isinstance(layers[0], SpatialToChannel) and layers[0].factor == 3
    for i in (1, 4):
        assert isinstance(layers[i], nn.LayerNorm) and layers[i].eps == 1e-5
    for i in (3, 6):
        assert isinstance(layers[i], nn.GELU) and layers[i].approximate == "none"
    assert _layout(layers) == {
        "1.weight": (9 * c,), "1.bias": (9 * c,),
        "2.weight": (3 * c, 9 * c), "2.bias": (3 * c,),
        "4.weight": (3 * c,), "4.bias": (3 * c,),
        "5.weight": (d, 3 * c), "5.bias": (d,),
        "7.weight": (d, d), "7.bias": (d,),
    }


def test_layout_linear_and_mlp_gelu():
    lin = build_projector_layers("linear", 6, 10)
    assert isinstance(lin, nn.Linear) and _layout(lin) == {"weight": (10, 6), "bias": (10,)}
    mlp2 = build_projector_layers("mlp2x_gelu", 6, 10)
    assert [type(m) for m in mlp2] == [nn.Linear, nn.GELU, nn.Linear]
    assert mlp2[1].approximate == "none"
    assert _layout(mlp2) == {"0.weight": (10, 6), "0.bias": (10,), "2.weight": (10, 10), "2.bias": (10,)}
    mlp3 = build_projector_layers("mlp3x_gelu", 6, 10)
    assert [type(m) for m in mlp3] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    proj = MultimodalProjector("mlp2x_gelu", 6, 10)
    assert set(proj.state_dict()) == {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}


@pytest.mark.parametrize("kind,k", [("mlp_downsample", 2), ("mlp_downsample_2x2_fix", 2), ("mlp_downsample_3x3_fix", 3)])
def test_projector_forward_matches_manual(kind, k):
    torch.manual_seed(3)
    c, d, n = 6, 10, 7
    proj = MultimodalProjector(kind, c, d)
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_()
    x = torch.randn(2, n * n, c)
    h = stc_loop(x, k)
    sd = {name: t for name, t in proj.state_dict().items()}
    erf_gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    ln = lambda t, i: F.layer_norm(t, (t.shape[-1],), sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"], eps=1e-5)  # noqa: E731
    lin = lambda t, i: t @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]  # noqa: E731
    if k == 2:
        want = lin(erf_gelu(lin(ln(h, 1), 2)), 4)
    else:
        want = lin(erf_gelu(lin(ln(erf_gelu(lin(ln(h, 1), 2)), 4), 5)), 7)
    got = proj(x)
    assert got.shape == (2, (-(-n // k)) ** 2, d)
    # float32 both sides, other op order: LayerNorm (mean, variance: 2 k^2 c), the first linear (k^2 c), later LayerNorm
    # and linears over d (at most 6 d), the erf GELUs (a few roundings each); terms up to max|want| (weights ~ N(0, 1))
    torch.testing.assert_close(got, want, **reordered(3 * k * k * c + 6 * d + 8, scale_of(want)))


# --------------------------------------------------------------------------- tiles <-> maps
def test_tokens_to_map_raster():
    tokens = torch.randn(3, 25, 4)
    torch.testing.assert_close(tokens_to_map(tokens), raster_map_loop(tokens), rtol=0, atol=0)  # data movement: bit-identical


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 2), (3, 4), (4, 3), (2, 6), (1, 9), (9, 1)])
def test_merge_split_tiles_vs_chessboard(rows, cols):
    tiles = torch.randn(rows * cols, 3, 5, 5)
    merged = merge_tiles(tiles, rows, cols)
    assert merged.shape == (1, 3, 5 * rows, 5 * cols)
    torch.testing.assert_close(merged, chessboard_merge_loop(tiles, rows, cols), rtol=0, atol=0)
    back = split_tiles(merged, rows, cols)
    torch.testing.assert_close(back, tiles, rtol=0, atol=0)
    # split is row-major: tile t is the window at (t // cols, t % cols)
    for t in range(rows * cols):
        i, j = divmod(t, cols)
        torch.testing.assert_close(back[t], merged[0, :, i * 5 : (i + 1) * 5, j * 5 : (j + 1) * 5], rtol=0, atol=0)


def test_split_tiles_rectangular_tiles():
    fmap = torch.randn(1, 2, 6, 12)
    tiles = split_tiles(fmap, 2, 3)
    assert tiles.shape == (6, 2, 3, 4)
    torch.testing.assert_close(merge_tiles(tiles, 2, 3), fmap, rtol=0, atol=0)


# --------------------------------------------------------------------------- merge_scales
def _s2_features(rows: int, cols: int, c: int = 3, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1 + 4 + rows * cols, 1024, c, generator=g).to(dtype)


def _maps(features: torch.Tensor, rows: int, cols: int):
    m0 = raster_map_loop(features[0:1])
    m1 = chessboard_merge_loop(raster_map_loop(features[1:5]), 2, 2)
    m2 = chessboard_merge_loop(raster_map_loop(features[5:]), rows, cols)
    return m0, m1, m2


def test_merge_scales_3x4_exact_patterns():
    rows, cols, c = 3, 4, 3
    feats = _s2_features(rows, cols, c)
    out = merge_scales(feats, [448, 896, 1344], (rows, cols))
    assert out.shape == (1, 3 * c, 96, 128)
    assert out.dtype == torch.float32
    m0, m1, m2 = _maps(feats, rows, cols)
    # scale 448: 32 -> 96 rows (x3), 32 -> 128 cols (x4), nearest replication
    want0 = m0[:, :, rep_index(32, 3)][:, :, :, rep_index(32, 4)]
    # scale 896: 64 -> 96 rows by the 1.5x pattern, 64 -> 128 cols by x2 replication
    want1 = upsample_1_5(m1, dim=2)[:, :, :, rep_index(64, 2)]
    # scale 1344: already 96 x 128
    want2 = m2
    torch.testing.assert_close(out[:, 0:c], want0, rtol=0, atol=0)
    torch.testing.assert_close(out[:, c : 2 * c], want1, **reordered(3, scale_of(want1)))  # an area bin of <= 2 rows, / 2
    torch.testing.assert_close(out[:, 2 * c :], want2, rtol=0, atol=0)
    # and the generic adaptive-pool bin rule agrees
    for m, sl in ((m0, slice(0, c)), (m1, slice(c, 2 * c)), (m2, slice(2 * c, 3 * c))):
        # float32 area bins (at most 2 x 2 values, then the division) against the float64 loop
        torch.testing.assert_close(out[:, sl].double(), area_resize_loop(m, (96, 128)), **reordered(5, scale_of(m)))


def test_upsample_pattern_equals_bin_rule():
    # the spec's 64->96 pattern is what the bin rule gives (checks the reference itself)
    v = torch.randn(1, 1, 64, 1)
    torch.testing.assert_close(upsample_1_5(v, dim=2).double(), area_resize_loop(v, (96, 1)), **reordered(3, scale_of(v)))  # <= 2 values, / 2
    assert area_bins(64, 96)[:6] == [(0, 1), (0, 2), (1, 2), (2, 3), (2, 4), (3, 4)]
    assert area_bins(32, 96)[:6] == [(0, 1), (0, 1), (0, 1), (1, 2), (1, 2), (1, 2)]


@pytest.mark.parametrize("grid", [(3, 3), (4, 3), (2, 6), (1, 9), (9, 1), (2, 5)])
def test_merge_scales_other_grids_vs_bin_rule(grid):
    rows, cols = grid
    c = 2
    feats = _s2_features(rows, cols, c, seed=rows * 10 + cols)
    out = merge_scales(feats, [448, 896, 1344], grid)
    assert out.shape == (1, 3 * c, 32 * rows, 32 * cols)
    for idx, m in enumerate(_maps(feats, rows, cols)):
        ref = area_resize_loop(m, (32 * rows, 32 * cols))
        torch.testing.assert_close(out[:, idx * c : (idx + 1) * c].double(), ref, **reordered(10, scale_of(m)))  # <= 3 x 3 bins, / count


def test_merge_scales_middle_output_index():
    rows, cols, c = 3, 4, 2
    feats = _s2_features(rows, cols, c, seed=11)
    out = merge_scales(feats, [448, 896, 1344], (rows, cols), output_scale_index=1)
    assert out.shape == (1, 3 * c, 64, 64)
    for idx, m in enumerate(_maps(feats, rows, cols)):
        ref = area_resize_loop(m, (64, 64))
        torch.testing.assert_close(out[:, idx * c : (idx + 1) * c].double(), ref, **reordered(10, scale_of(m)))  # <= 3 x 3 bins, / count
    out0 = merge_scales(feats, [448, 896, 1344], (rows, cols), output_scale_index=0)
    assert out0.shape == (1, 3 * c, 32, 32)


def test_merge_scales_bf16_interpolates_in_fp32(monkeypatch):
    rows, cols, c = 3, 4, 3
    feats32 = _s2_features(rows, cols, c, seed=4)
    feats16 = feats32.to(torch.bfloat16)
    seen = []
    real = F.interpolate

    def spy(x, *args, **kwargs):
        seen.append((x.dtype, kwargs.get("mode")))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(multiscale.F, "interpolate", spy)
    out = merge_scales(feats16, [448, 896, 1344], (rows, cols))
    monkeypatch.undo()
    assert out.dtype == torch.bfloat16
    assert seen and all(dt == torch.float32 and mode == "area" for dt, mode in seen)
    # values: compute each map in fp32 (independently), then cast to bf16
    m0, m1, m2 = _maps(feats16.float(), rows, cols)
    want = torch.cat([area_resize_loop(m, (96, 128)).float().to(torch.bfloat16) for m in (m0, m1, m2)], dim=1)
    assert torch.equal(out, want)


def test_merge_scales_rejects_wrong_tile_count():
    feats = _s2_features(3, 4, 2)
    with pytest.raises(Exception):
        merge_scales(feats[:-1], [448, 896, 1344], (3, 4))


def test_output_grid():
    scales = [448, 896, 1344]
    assert output_grid(scales, (3, 4), -1) == (3, 4)
    assert output_grid(scales, (3, 4), 2) == (3, 4)
    assert output_grid(scales, (3, 4), 1) == (2, 2)
    assert output_grid(scales, (2, 6), 0) == (1, 1)


def test_full_s2_projection_token_raster():
    """split -> STC per 32x32 tile -> re-merge -> raster: token count R*C*256 and global raster order (spec §2.3)."""
    rows, cols = 3, 4
    fmap = torch.arange(96 * 128, dtype=torch.float32).reshape(1, 1, 96, 128)
    tiles = split_tiles(fmap, rows, cols)  # [12, 1, 32, 32]
    tok = tiles.flatten(2).transpose(1, 2)  # [12, 1024, 1]
    stc = SpatialToChannel(2)(tok)  # [12, 256, 4]
    merged = merge_tiles(tokens_to_map(stc), rows, cols)  # [1, 4, 48, 64]
    flat = merged[0].flatten(1).T  # [(h w), 4]
    assert flat.shape == (12 * 256, 4)
    # token (Y, X) of the whole 48x64 grid holds the 2x2 window at rows 2Y.., cols 2X.. of the big map
    for y, x in [(0, 0), (0, 17), (15, 15), (16, 0), (47, 63), (20, 33)]:
        win = fmap[0, 0, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2].reshape(-1)
        assert flat[y * 64 + x].tolist() == win.tolist()


# --------------------------------------------------------------------------- full-size presets (meta)
@pytest.fixture(scope="module")
def meta_models():
    from nvila_ft.model.presets import build_model

    return {name: build_model(name, device="meta") for name in ("nvila-8b", "nvila-lite-2b", "nvila-lite-8b", "nvila-8b-video")}


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _expected_2x2(c: int, d: int) -> dict[str, tuple[int, ...]]:
    return {
        "layers.1.weight": (4 * c,), "layers.1.bias": (4 * c,),
        "layers.2.weight": (d, 4 * c), "layers.2.bias": (d,),
        "layers.4.weight": (d, d), "layers.4.bias": (d,),
    }


def _expected_3x3(c: int, d: int) -> dict[str, tuple[int, ...]]:
    return {
        "layers.1.weight": (9 * c,), "layers.1.bias": (9 * c,),
        "layers.2.weight": (3 * c, 9 * c), "layers.2.bias": (3 * c,),
        "layers.4.weight": (3 * c,), "layers.4.bias": (3 * c,),
        "layers.5.weight": (d, 3 * c), "layers.5.bias": (d,),
        "layers.7.weight": (d, d), "layers.7.bias": (d,),
    }


def test_full_projector_nvila_8b(meta_models):
    m = meta_models["nvila-8b"]
    assert m.config.projector_type == "mlp_downsample"
    assert m.config.mm_hidden_size == 3456 and m.config.llm_hidden_size == 3584
    assert _shapes(m.mm_projector) == _expected_2x2(3456, 3584)
    n = sum(p.numel() for p in m.mm_projector.parameters())
    assert round(n / 1e6, 2) == 62.43
    assert n * 2 / 1e6 == pytest.approx(124.9, abs=0.05)  # bf16 MB as quoted, to half its last digit


def test_full_projector_lite(meta_models):
    for name, d, millions in (("nvila-lite-2b", 1536, None), ("nvila-lite-8b", 3584, 61.10)):
        m = meta_models[name]
        assert m.config.projector_type == "mlp_downsample_3x3_fix"
        assert m.config.mm_hidden_size == 1152 and m.config.llm_hidden_size == d
        assert _shapes(m.mm_projector) == _expected_3x3(1152, d)
        if millions is not None:
            n = sum(p.numel() for p in m.mm_projector.parameters())
            assert round(n / 1e6, 2) == millions
            assert n * 2 / 1e6 == pytest.approx(122.2, abs=0.05)


def test_full_projector_video(meta_models):
    m = meta_models["nvila-8b-video"]
    assert m.config.projector_type == "mlp_downsample_2x2_fix"
    c = m.config.mm_hidden_size
    # mm_hidden_size = 1152 x len(scales) for (dynamic) S2, else 1152 (spec §1.2); the video preset uses `resize`
    assert m.config.image_aspect_ratio == "resize" and not m.config.dynamic_s2 and c == 1152
    assert m.config.llm_hidden_size == 3584
    assert _shapes(m.mm_projector) == _expected_2x2(c, 3584)


def _spec_vision_keys(layers: int = 27) -> dict[str, tuple[int, ...]]:
    h, f = 1152, 4304
    keys = {
        "vision_model.embeddings.patch_embedding.weight": (h, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (h,),
        "vision_model.embeddings.position_embedding.weight": (1024, h),
        "vision_model.post_layernorm.weight": (h,),
        "vision_model.post_layernorm.bias": (h,),
    }
    for i in range(layers):
        p = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys[p + f"self_attn.{proj}.weight"] = (h, h)
            keys[p + f"self_attn.{proj}.bias"] = (h,)
        for ln in ("layer_norm1", "layer_norm2"):
            keys[p + f"{ln}.weight"] = (h,)
            keys[p + f"{ln}.bias"] = (h,)
        keys[p + "mlp.fc1.weight"] = (f, h)
        keys[p + "mlp.fc1.bias"] = (f,)
        keys[p + "mlp.fc2.weight"] = (h, f)
        keys[p + "mlp.fc2.bias"] = (h,)
    return keys


@pytest.mark.parametrize("name", ["nvila-8b", "nvila-lite-2b", "nvila-lite-8b", "nvila-8b-video"])
def test_full_vision_tower(meta_models, name):
    from nvila_ft.model.checkpoint import VISION_PREFIX

    tower = meta_models[name].vision_tower.model
    assert tower.config.num_hidden_layers == 27
    # on-disk names are relative to SiglipVisionModel, i.e. start with "vision_model."
    shapes = {(k if k.startswith(VISION_PREFIX) else VISION_PREFIX + k): s for k, s in _shapes(tower).items()}
    assert shapes == _spec_vision_keys(27)
    assert not [k for k in shapes if "head" in k]
    n = sum(p.numel() for p in tower.parameters())
    assert round(n / 1e6, 1) == 413.3
    assert n * 2 / 1e6 == pytest.approx(826.7, abs=0.05)


def test_full_llm_nvila_8b(meta_models):
    llm = meta_models["nvila-8b"].llm
    shapes = _shapes(llm)
    d, v, f = 3584, 151648, 18944
    assert shapes["model.embed_tokens.weight"] == (v, d)
    assert shapes["lm_head.weight"] == (v, d)
    assert shapes["model.norm.weight"] == (d,)
    assert llm.config.tie_word_embeddings is False
    assert llm.lm_head.weight is not llm.model.embed_tokens.weight
    for i in (0, 27):
        p = f"model.layers.{i}."
        assert shapes[p + "self_attn.q_proj.weight"] == (d, d)
        assert shapes[p + "self_attn.q_proj.bias"] == (d,)
        assert shapes[p + "self_attn.k_proj.weight"] == (512, d)
        assert shapes[p + "self_attn.k_proj.bias"] == (512,)
        assert shapes[p + "self_attn.v_proj.weight"] == (512, d)
        assert shapes[p + "self_attn.v_proj.bias"] == (512,)
        assert shapes[p + "self_attn.o_proj.weight"] == (d, d)
        assert p + "self_attn.o_proj.bias" not in shapes
        assert shapes[p + "mlp.gate_proj.weight"] == (f, d)
        assert shapes[p + "mlp.up_proj.weight"] == (f, d)
        assert shapes[p + "mlp.down_proj.weight"] == (d, f)
        assert shapes[p + "input_layernorm.weight"] == (d,)
        assert shapes[p + "post_attention_layernorm.weight"] == (d,)
    assert "model.layers.28.input_layernorm.weight" not in shapes
    assert len(shapes) == 2 + 1 + 28 * 12
    cfg = llm.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (28, 4, 28)
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta")
    assert theta == 1e6
    assert cfg.rms_norm_eps == 1e-6


def test_full_llm_lite_2b_tied(meta_models):
    llm = meta_models["nvila-lite-2b"].llm
    assert llm.config.tie_word_embeddings is True
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    shapes = _shapes(llm)
    assert shapes["model.embed_tokens.weight"] == (151648, 1536)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 1536)  # 2 KV heads x 128
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (8960, 1536)


# --------------------------------------------------------------------------- tiny presets on disk
def _disk_keys(folder):
    from safetensors import safe_open

    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


@pytest.mark.parametrize("name", ["nvila-8b-tiny", "nvila-lite-tiny", "nvila-video-tiny"])
def test_tiny_checkpoint_on_disk_keys(tiny_checkpoints, name):
    import json

    root = tiny_checkpoints[name]
    top = json.loads((root / "config.json").read_text())
    vcfg = json.loads((root / "vision_tower" / "config.json").read_text())
    lcfg = json.loads((root / "llm" / "config.json").read_text())
    pcfg = json.loads((root / "mm_projector" / "config.json").read_text())

    vision = _disk_keys(root / "vision_tower")
    assert vision and all(k.startswith("vision_model.") for k in vision)
    assert not [k for k in vision if k.startswith("head.") or ".head." in k]
    layers = vcfg["num_hidden_layers"]
    per_layer = 4 * 2 + 2 * 2 + 2 * 2
    assert len(vision) == 3 + layers * per_layer + 2
    assert f"vision_model.encoder.layers.{layers - 1}.mlp.fc2.bias" in vision
    assert "vision_model.post_layernorm.weight" in vision

    c, d = top["mm_hidden_size"], lcfg["hidden_size"]
    kind = pcfg["mm_projector_type"]
    proj = _disk_keys(root / "mm_projector")
    want = _expected_3x3(c, d) if kind == "mlp_downsample_3x3_fix" else _expected_2x2(c, d)
    assert proj == want
    if name == "nvila-8b-tiny":
        assert kind == "mlp_downsample" and c == 3 * vcfg["hidden_size"]
    elif name == "nvila-lite-tiny":
        assert kind == "mlp_downsample_3x3_fix" and c == vcfg["hidden_size"]
    else:
        assert kind == "mlp_downsample_2x2_fix"

    llm = _disk_keys(root / "llm")
    n_layers = lcfg["num_hidden_layers"]
    std = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        std |= {p + s for s in (
            "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
            "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
            "input_layernorm.weight", "post_attention_layernorm.weight")}
    if lcfg["tie_word_embeddings"]:
        assert name == "nvila-lite-tiny"
        assert set(llm) == std  # tied: no lm_head.weight on disk
    else:
        assert set(llm) == std | {"lm_head.weight"}
        assert llm["lm_head.weight"] == llm["model.embed_tokens.weight"]
