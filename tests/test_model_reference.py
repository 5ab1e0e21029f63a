"""The model's forward pass against a reference written independently, step by step with loops.

The reference uses stock `SiglipVisionModel(..., output_hidden_states=True).hidden_states[-2]` (the model
itself runs only the needed layers), explicit tile placement, explicit k x k windows, the projector's
weights applied with functional ops, and a hand-built input sequence.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.presets import build_model
from tests.tolerances import TINY_FORWARD, reordered, scale_of


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def reference_vision(model, tiles: torch.Tensor) -> torch.Tensor:
    out = model.vision_tower.model(tiles, output_hidden_states=True)
    return out.hidden_states[-2]


def tile_map(tokens: torch.Tensor) -> torch.Tensor:
    """[N, C] raster tokens -> [C, n, n]."""
    n = int(round(tokens.shape[0] ** 0.5))
    out = torch.zeros(tokens.shape[1], n, n, dtype=tokens.dtype)
    for i in range(n):
        for j in range(n):
            out[:, i, j] = tokens[i * n + j]
    return out


def place(tiles: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """Row-major tiles [C, h, w] -> [C, rows*h, cols*w]."""
    c, h, w = tiles[0].shape
    out = torch.zeros(c, rows * h, cols * w, dtype=tiles[0].dtype)
    for t, tile in enumerate(tiles):
        r, q = divmod(t, cols)
        out[:, r * h : (r + 1) * h, q * w : (q + 1) * w] = tile
    return out


def stc(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """[N, C] -> [ceil(n/k)^2, k*k*C] with explicit windows and zero padding at the bottom/right."""
    grid = tile_map(tokens)  # [C, n, n]
    c, n, _ = grid.shape
    m = -(-n // k)
    padded = torch.zeros(c, m * k, m * k, dtype=grid.dtype)
    padded[:, :n, :n] = grid
    out = []
    for bi in range(m):
        for bj in range(m):
            window = [padded[:, bi * k + dr, bj * k + dc] for dr in range(k) for dc in range(k)]
            out.append(torch.cat(window))
    return torch.stack(out)


def apply_projector(model, x: torch.Tensor) -> torch.Tensor:
    """The projector's MLP (everything after STC) with functional ops on its own weights."""
    for module in list(model.mm_projector.layers)[1:]:
        if isinstance(module, torch.nn.LayerNorm):
            x = F.layer_norm(x, module.normalized_shape, module.weight, module.bias, 1e-5)
        elif isinstance(module, torch.nn.Linear):
            x = x @ module.weight.T + module.bias
        else:
            x = 0.5 * x * (1 + torch.erf(x / 2**0.5))
    return x


def newline(model) -> torch.Tensor:
    ids = model.tokenizer("\n").input_ids
    return model.get_input_embeddings().weight[ids]


def reference_s2_image(model, pixel_values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    feats = reference_vision(model, pixel_values)
    maps = [tile_map(feats[0]), place([tile_map(f) for f in feats[1:5]], 2, 2), place([tile_map(f) for f in feats[5:]], rows, cols)]
    size = maps[-1].shape[-2:]
    merged = torch.cat([F.adaptive_avg_pool2d(m[None].float(), size)[0] for m in maps])  # area resize
    n = model.config.patches_per_side
    out_tiles = []
    for r in range(rows):
        for q in range(cols):
            block = merged[:, r * n : (r + 1) * n, q * n : (q + 1) * n]
            tokens = torch.stack([block[:, i, j] for i in range(n) for j in range(n)])
            out_tiles.append(apply_projector(model, stc(tokens, 2)))
    t = int(round(out_tiles[0].shape[0] ** 0.5))
    raster = []
    for big_row in range(rows * t):
        for big_col in range(cols * t):
            tile = out_tiles[(big_row // t) * cols + big_col // t]
            raster.append(tile[(big_row % t) * t + big_col % t])
    return torch.cat([torch.stack(raster), newline(model)])


def reference_logits(model, input_ids: torch.Tensor, runs: list[torch.Tensor]) -> torch.Tensor:
    """The LLM on a hand-built sequence: the rows of the media runs ([features; "\n"] per item or frame, as the
    official encoders build them) at the processor's placeholders, in order; a "\n" row sits where the processor
    wrote the boundary id after a placeholder run, and must be that id's embedding."""
    embed = model.get_input_embeddings().weight
    placeholders = (model.token_ids.image, model.token_ids.video)
    rows, pieces, ids = iter([row for run in runs for row in run]), [], input_ids.tolist()
    for position, token in enumerate(ids):
        if token in placeholders:
            pieces.append(next(rows)[None])
        elif position and ids[position - 1] in placeholders:
            boundary = next(rows)
            torch.testing.assert_close(boundary, embed[token], atol=0, rtol=0)  # the embedding row itself, copied
            pieces.append(boundary[None])
        else:
            pieces.append(embed[token][None])
    assert next(rows, None) is None
    sequence = torch.cat(pieces)[None]
    return model.llm(inputs_embeds=sequence).logits[0]


@torch.no_grad()
def test_dynamic_s2_image_matches_reference():
    model = build_model("nvila-8b-tiny", seed=1)
    processor = NVILAProcessor(model.tokenizer, model.config)
    conversation = [{"role": "user", "content": [{"type": "image", "image": random_image(130, 70, 0)}, {"type": "text", "text": "What is it?"}]}]
    batch = processor(conversation, add_generation_prompt=True)
    rows, cols = batch["image_grids"][0].tolist()
    run = reference_s2_image(model, batch["pixel_values"], rows, cols)
    assert run.shape[0] == rows * cols * 4 + 1
    expected = reference_logits(model, batch["input_ids"][0], [run])
    actual = model(**batch).logits[0]
    assert int((batch["input_ids"][0] == model.token_ids.image).sum()) == run.shape[0] - 1  # one placeholder per token
    assert actual.shape == expected.shape == (batch["input_ids"].shape[1], 2048)
    # hand-written reference (loops, other shapes): every reduction from pixels to logits may be reordered
    torch.testing.assert_close(actual, expected, **reordered(TINY_FORWARD, scale_of(expected)))


@torch.no_grad()
def test_dynamic_s2_multi_image_prompt_uses_single_tiles_repeated_on_channels():
    model = build_model("nvila-8b-tiny", seed=2)
    processor = NVILAProcessor(model.tokenizer, model.config)
    images = [random_image(50, 90, 1), random_image(64, 64, 2)]
    content = [{"type": "image", "image": i} for i in images] + [{"type": "text", "text": "Compare."}]
    batch = processor([{"role": "user", "content": content}], add_generation_prompt=True)
    assert batch["pixel_values"].shape[0] == 2 and batch["image_grids"].tolist() == [[0, 0], [0, 0]]
    runs = []
    for tile in batch["pixel_values"]:
        feats = reference_vision(model, tile[None])[0]
        tokens = torch.cat([feats] * 3, dim=1)  # one scale stands in for the three
        runs.append(torch.cat([apply_projector(model, stc(tokens, 2)), newline(model)]))
    expected = reference_logits(model, batch["input_ids"][0], runs)
    torch.testing.assert_close(model(**batch).logits[0], expected, **reordered(TINY_FORWARD, scale_of(expected)))


@torch.no_grad()
def test_lite_tiles_match_reference():
    model = build_model("nvila-lite-tiny", seed=3)
    processor = NVILAProcessor(model.tokenizer, model.config)
    conversation = [{"role": "user", "content": [{"type": "image", "image": random_image(100, 60, 3)}, {"type": "text", "text": "Describe."}]}]
    batch = processor(conversation, add_generation_prompt=True)
    assert batch["pixel_values"].shape[0] > 1  # tiles plus thumbnail
    runs = []
    for tile in batch["pixel_values"]:
        feats = reference_vision(model, tile[None])[0]
        runs.append(torch.cat([apply_projector(model, stc(feats, 3)), newline(model)]))
    assert runs[0].shape[0] == 4 + 1  # 4x4 patches padded to 6x6 -> 2x2 tokens
    expected = reference_logits(model, batch["input_ids"][0], runs)
    torch.testing.assert_close(model(**batch).logits[0], expected, **reordered(TINY_FORWARD, scale_of(expected)))


@torch.no_grad()
def test_tsp_video_matches_reference():
    model = build_model("nvila-video-tiny", seed=4)
    processor = NVILAProcessor(model.tokenizer, model.config)
    frames = [random_image(40, 30, 10 + t) for t in range(16)]
    conversation = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}]}]
    batch = processor(conversation, add_generation_prompt=True)
    video = batch["video_pixel_values"]
    assert video.shape[0] == 16
    per_frame = torch.stack([apply_projector(model, stc(reference_vision(model, f[None])[0], 2)) for f in video])
    pooled = torch.stack([per_frame[g * 8 : (g + 1) * 8].mean(0) for g in range(2)])  # [[8, 1, 1]]
    run = torch.cat([torch.cat([p, newline(model)]) for p in pooled])
    assert run.shape[0] == 2 * (4 + 1)
    expected = reference_logits(model, batch["input_ids"][0], [run])
    torch.testing.assert_close(model(**batch).logits[0], expected, **reordered(TINY_FORWARD, scale_of(expected)))


@torch.no_grad()
@pytest.mark.parametrize("preset", ["nvila-8b-tiny", "nvila-lite-tiny"])
def test_basic_video_appends_newline_after_every_frame(preset):
    model = build_model(preset, seed=5)
    processor = NVILAProcessor(model.tokenizer, model.config)
    frames = [random_image(40, 30, 30 + t) for t in range(8)]
    batch = processor([{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "Go"}]}], add_generation_prompt=True)
    k = model.config.stc_factor
    scales = len(model.config.s2_scales) if model.config.dynamic_s2 else 1
    runs = []
    for frame in batch["video_pixel_values"]:
        feats = torch.cat([reference_vision(model, frame[None])[0]] * scales, dim=1)
        runs.append(torch.cat([apply_projector(model, stc(feats, k)), newline(model)]))
    expected = reference_logits(model, batch["input_ids"][0], [torch.cat(runs)])
    torch.testing.assert_close(model(**batch).logits[0], expected, **reordered(TINY_FORWARD, scale_of(expected)))
