"""Referring-expression grounding: the box format, IoU and its metric, the grounding sources, the built-in set,
and that tiling keeps fractions of the original image. Expected values are computed by hand in each test."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from nvila_ft.data.kit import DataError
from nvila_ft.domains.baselines import baseline_predictions
from nvila_ft.domains.grounding.baselines import mean_box
from nvila_ft.domains.grounding.boxes import BoxError, box_from_pixels, check_box, format_box, iou, parse_box
from nvila_ft.domains.grounding.generator import make_grounding_dataset
from nvila_ft.domains.grounding.metrics import iou_accuracy
from nvila_ft.domains.grounding.referring import GroundingData
from nvila_ft.domains.scoring import compute_metrics
from nvila_ft.domains.synthetic import COLORS
from tests.tolerances import METRIC  # float64 metrics: 64 roundings of values <= 1


# ----------------------------------------------------------------------------------------------- format
def test_format_box_writes_two_decimals_clamped():
    assert format_box((0.1234, 0.5, 0.999, 1.0)) == "[0.12, 0.50, 1.00, 1.00]"
    assert format_box((-0.01, 0.0, 0.5, 1.2)) == "[0.00, 0.00, 0.50, 1.00]"


@pytest.mark.parametrize("text", [
    "[0.1, 0.2, 0.5, 0.6]", "(0.1, 0.2, 0.5, 0.6)", "[0.1 0.2 0.5 0.6]", "0.1, 0.2, 0.5, 0.6", "0.1 0.2 0.5 0.6.",
    "The box is [0.10,0.20,0.50,0.60].", "  [ .1 , .2 , .5 , .6 ]  ", "[[0.1, 0.2, 0.5, 0.6]]",
])
def test_parse_box_is_lenient_about_layout(text):
    assert parse_box(text) == ((0.1, 0.2, 0.5, 0.6), None)


def test_parse_box_round_trips_format_box():
    box = (0.05, 0.36, 0.3, 0.61)
    assert parse_box(format_box(box)).box == box
    assert parse_box("[0, 0, 1, 1]").box == (0.0, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("text, problem", [
    ("", "no box found"),
    ("I cannot see it.", "no box found in 'I cannot see it.'"),
    ("row 2, column 3", "'row' is not a number"),
    ("[0.1, 0.2, 0.5]", "got 3 item(s)"),
    ("[0.1, 0.2, 0.5, 0.6, 0.7]", "got 5 item(s)"),
    ("[0.1, zero, 0.5, 0.6]", "'zero' is not a number"),
    ("[0.1, nan, 0.5, 0.6]", "not a finite number"),
    ("[12, 30, 45, 60]", "x1, y1, x2, y2 outside [0, 1]"),
    ("[0.5, 0.2, 0.1, 0.6]", "x2 < x1"),
    (None, "expected text"),
])
def test_parse_box_reports_malformed_text_instead_of_raising(text, problem):
    parsed = parse_box(text)
    assert parsed.box is None and problem in parsed.problem


def test_check_box_can_refuse_empty_boxes():
    assert check_box((0.2, 0.2, 0.2, 0.5)) == (0.2, 0.2, 0.2, 0.5)
    with pytest.raises(BoxError, match="zero area"):
        check_box((0.2, 0.2, 0.2, 0.5), allow_empty=False)


# ----------------------------------------------------------------------------------------------- IoU
@pytest.mark.parametrize("a, b, expected", [
    ((0.0, 0.0, 0.5, 0.5), (0.0, 0.0, 0.5, 0.5), 1.0),                # identical
    ((0.0, 0.0, 0.4, 0.4), (0.2, 0.2, 0.6, 0.6), 0.04 / 0.28),         # overlap 0.2x0.2, union 0.16+0.16-0.04
    ((0.0, 0.0, 0.2, 0.2), (0.5, 0.5, 0.9, 0.9), 0.0),                 # disjoint
    ((0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75), 0.25),            # contained: 0.25 / 1
    ((0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), 0.0),                 # touching along an edge
    ((0.0, 0.0, 0.5, 1.0), (0.25, 0.5, 1.0, 1.0), 0.125 / 0.75),       # overlap 0.25x0.5; union 0.5+0.375-0.125
    ((0.3, 0.3, 0.3, 0.6), (0.0, 0.0, 1.0, 1.0), 0.0),                 # degenerate (zero width) prediction
    ((0.3, 0.3, 0.3, 0.3), (0.3, 0.3, 0.3, 0.3), 0.0),                 # two points: no union
    # pixel edges 0..10 and 1..11 of 100 px: 90/110, not VILA's inclusive-pixel 110/132 (the iou docstring)
    ((0.0, 0.0, 0.10, 0.10), (0.01, 0.0, 0.11, 0.10), 90 / 110),
])
def test_iou_against_hand_computation(a, b, expected):
    assert iou(a, b) == pytest.approx(expected, abs=METRIC, rel=0)
    assert iou(b, a) == pytest.approx(expected, abs=METRIC, rel=0)


def test_iou_accuracy_counts_hits_mean_iou_and_malformed_predictions():
    reference = "[0.00, 0.00, 0.40, 0.40]"
    predictions = [
        "[0.00, 0.00, 0.40, 0.40]",   # IoU 1
        "[0.00, 0.00, 0.40, 0.30]",   # 0.12 / 0.16 = 0.75: a hit at 0.5 and exactly at 0.75
        "[0.20, 0.20, 0.60, 0.60]",   # 0.04 / 0.28 = 0.1429
        "the red circle",             # malformed: IoU 0
        "[0.5, 0.5]",                 # malformed
    ]
    scores = iou_accuracy(predictions, [reference] * 5)
    assert scores["iou_accuracy"] == pytest.approx(2 / 5, abs=METRIC, rel=0)
    assert scores["mean_iou"] == pytest.approx((1 + 0.75 + 0.04 / 0.28) / 5, abs=METRIC, rel=0)
    assert scores["malformed_box_rate"] == pytest.approx(2 / 5, abs=METRIC, rel=0)
    strict = compute_metrics(["iou_accuracy_75"], predictions, [reference] * 5)
    assert strict["iou_accuracy_75"] == pytest.approx(2 / 5, abs=METRIC, rel=0) and strict["count"] == 5
    assert iou_accuracy(predictions, [reference] * 5, threshold=0.9)["iou_accuracy_90"] == pytest.approx(1 / 5, abs=METRIC, rel=0)


def test_iou_accuracy_never_raises_on_garbage_references_or_predictions():
    scores = compute_metrics(["iou_accuracy"], ["", "[1, 2, 3, 4]", "[[["], ["not a box", "[0.1, 0.1, 0.2, 0.2]", ""])
    assert scores == {"iou_accuracy": 0.0, "mean_iou": 0.0, "malformed_box_rate": 1.0, "count": 3.0}


def test_mean_box_baseline_for_box_answers_only():
    assert mean_box(["[0.00, 0.00, 0.40, 0.40]", "[0.20, 0.40, 0.60, 1.00]"]) == "[0.10, 0.20, 0.50, 0.70]"
    assert mean_box(["[0.00, 0.00, 0.40, 0.40]", "yes"]) is None


# ----------------------------------------------------------------------------------------------- pixels
def test_box_from_pixels_xywh_and_xyxy():
    assert box_from_pixels([20, 10, 30, 40], 200, 100, "xywh") == pytest.approx((0.1, 0.1, 0.25, 0.5), abs=METRIC, rel=0)
    assert box_from_pixels([20, 10, 50, 50], 200, 100, "xyxy") == pytest.approx((0.1, 0.1, 0.25, 0.5), abs=METRIC, rel=0)
    # COCO's float boxes may overshoot the border by a fraction of a pixel: clipped, not refused
    assert box_from_pixels([150.0, 60.0, 50.3, 40.2], 200, 100) == pytest.approx((0.75, 0.6, 1.0, 1.0), abs=METRIC, rel=0)


@pytest.mark.parametrize("bbox, fmt, message", [
    ([10, 10, 0, 20], "xywh", "zero or negative area"),
    ([10, 10, 5, 20], "xyxy", "x2 <= x1"),
    ([150, 10, 60, 20], "xywh", "reaches outside the 200x100 image"),
    ([-5, 10, 20, 20], "xywh", "reaches outside"),
    ([1, 2, 3], "xywh", "expected 4 numbers [x, y, w, h]"),
    ([1, "2", 3, 4], "xywh", "expected numbers"),
    ("0 0 10 10", "xywh", "expected 4 numbers"),
])
def test_box_from_pixels_refuses_bad_boxes(bbox, fmt, message):
    with pytest.raises(BoxError, match=message.replace("[", r"\[")):
        box_from_pixels(bbox, 200, 100, fmt)
    with pytest.raises(BoxError, match="the image is 0x100 pixels"):  # not a ZeroDivisionError
        box_from_pixels([0, 0, 0.4, 0.4], 0, 100, fmt)


# ----------------------------------------------------------------------------------------------- sources
@pytest.fixture()
def refcoco_dir(tmp_path):
    Image.new("RGB", (200, 100), "white").save(tmp_path / "wide.png")
    Image.new("RGB", (50, 80), "white").save(tmp_path / "tall.jpg")
    return tmp_path


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_refcoco_layout_normalises_pixel_boxes_by_the_image_header(refcoco_dir):
    path = _write(refcoco_dir / "refs.json", [
        {"image": "wide.png", "expression": "the cat on the left", "bbox": [20, 10, 30, 40], "id": 7},
        {"image": "tall.jpg", "sentences": [{"sent": "tall thing"}, "the tall thing"], "bbox": [5, 8, 20, 40],
         "width": 50, "height": 80},
    ])
    source = GroundingData(str(path))
    records = source.records()
    assert source.errors == []
    assert [r.answer for r in records] == ["[0.10, 0.10, 0.25, 0.50]"] + ["[0.10, 0.10, 0.50, 0.60]"] * 2
    assert records[0].question == (
        "Please provide the bounding box coordinate of the region this sentence describes: the cat on the left."
    )
    assert [r.id for r in records] == ["7", "1#0", "1#1"]
    assert records[1].question.endswith(": tall thing.") and records[2].question.endswith(": the tall thing.")
    assert records[0].origin == f"{path}[0]" and records[0].meta["image_size"] == [200, 100]
    assert records[0].messages[0]["content"][0] == {"type": "image", "image": "wide.png"}
    xyxy = GroundingData(str(path), bbox_format="xyxy", on_error="collect").records()
    assert xyxy[0].answer == "[0.10, 0.10, 0.15, 0.40]"  # the same numbers read as corners


def test_refcoco_layout_reports_each_bad_record_with_file_index_and_field(refcoco_dir):
    path = _write(refcoco_dir / "refs.json", [
        {"image": "wide.png", "expression": "ok", "bbox": [0, 0, 10, 10]},
        {"image": "wide.png", "expression": "outside", "bbox": [190, 0, 30, 10]},
        {"image": "wide.png", "expression": "flat", "bbox": [10, 10, 20, 0]},
        {"image": "wide.png", "expression": "short", "bbox": [10, 10, 20]},
        {"image": "wide.png", "expression": "words", "bbox": ["a", 1, 2, 3]},
        {"image": "missing.png", "expression": "gone", "bbox": [0, 0, 10, 10]},
        {"image": "wide.png", "bbox": [0, 0, 10, 10]},
        {"image": "wide.png", "expression": "no box"},
        {"image": "wide.png", "expression": "resized", "bbox": [0, 0, 10, 10], "width": 400},
        {"image": "wide.png", "expression": "tiny", "bbox": [10, 10, 0.5, 10]},
        "not an object",
        {"image": "../escape.png", "expression": "x", "bbox": [0, 0, 1, 1]},
    ])
    source = GroundingData(str(path))
    records = source.records()
    assert [r.question.rsplit(": ", 1)[1] for r in records] == ["ok."]
    lines = {int(e.origin.rsplit("[", 1)[1].rstrip("]")): (e.kind, e.reason) for e in source.errors}
    assert all(e.origin.startswith(f"{path}[") for e in source.errors)
    assert lines[1] == ("structure", "field 'bbox': [190, 0, 30, 10] (xywh) reaches outside the 200x100 image")
    assert lines[2][1].startswith("field 'bbox': zero or negative area")
    assert lines[3][1].startswith("field 'bbox': expected 4 numbers")
    assert lines[4][1].startswith("field 'bbox': expected numbers")
    assert lines[5][0] == "missing_media" and lines[5][1].startswith("field 'image': missing.png: not found")
    assert "neither 'expression' nor 'sentences'" in lines[6][1]
    assert lines[7][1].startswith("field 'bbox': missing")
    assert lines[8][1] == "field 'width': 400, but the image is 200x100 (boxes are in the image's pixels)"
    assert lines[9][1].startswith("field 'bbox': zero area once written as [0.05, 0.10, 0.05, 0.20]")
    assert lines[10][1].startswith("expected an object")
    assert lines[11][0] == "unsafe_path"
    with pytest.raises(DataError, match=r"refs\.json\[1\]: field 'bbox': .* reaches outside"):
        GroundingData(str(path), on_error="raise").records()


def test_llava_layout_checks_that_answers_are_boxes(tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    turns = lambda answer: [{"from": "human", "value": "<image>\nWhere is the dog?"}, {"from": "gpt", "value": answer}]  # noqa: E731
    path = _write(tmp_path / "data.json", [
        {"image": "a.png", "conversations": turns("[0.10, 0.20, 0.30, 0.40]")},
        {"image": "a.png", "conversations": turns("on the left")},
        {"image": "a.png", "conversations": turns("[0.10, 0.20, 1.30, 0.40]")},
        {"image": "a.png"},
    ])
    source = GroundingData(str(path), layout="llava")
    records = source.records()
    assert [r.answer for r in records] == ["[0.10, 0.20, 0.30, 0.40]"]
    assert records[0].question_type == "ground"
    reasons = {e.origin: e.reason for e in source.errors}
    assert reasons[f"{path}[1]"].startswith("field 'conversations' (the last gpt value): not a box: no box found in 'on the left'")
    assert "x2 outside [0, 1]" in reasons[f"{path}[2]"]
    assert f"{path}[3]" in reasons


def test_grounding_source_refuses_bad_settings():
    with pytest.raises(ValueError, match="layout must be one of"):
        GroundingData("x.json", layout="coco")
    with pytest.raises(ValueError, match="bbox_format must be one of"):
        GroundingData("x.json", bbox_format="cxcywh")
    with pytest.raises(ValueError, match="must contain"):
        GroundingData("x.json", question_template="Where?")


# ----------------------------------------------------------------------------------------------- built-in
def test_builtin_grounding_answers_are_the_drawn_shapes_boxes(tmp_path):
    data = json.loads(make_grounding_dataset(tmp_path, 12, seed=3, image_size=64, grid=3).read_text())
    again = make_grounding_dataset(tmp_path / "again", 12, seed=3, image_size=64, grid=3)
    assert json.loads(again.read_text()) == data  # the same seed draws the same records
    for record in data:
        question = record["conversations"][0]["value"]
        color = question.rsplit("the ", 1)[1].split()[0]
        pixels = np.asarray(Image.open(tmp_path / record["image"]).convert("RGB"))
        ys, xs = np.nonzero(np.all(pixels == COLORS[color], axis=-1))
        # independent of the generator: the colour's pixel extent, as pixel edges over the image size
        expected = f"[{xs.min() / 64:.2f}, {ys.min() / 64:.2f}, {(xs.max() + 1) / 64:.2f}, {(ys.max() + 1) / 64:.2f}]"
        assert record["conversations"][1]["value"] == expected
        assert record["question_type"] == "ground"


def test_builtin_grounding_is_the_default_of_the_source(tmp_path):
    source = GroundingData(synthetic={"num_records": 5, "seed": 1, "grid": 2, "cache_dir": str(tmp_path)})
    records = source.records()
    assert len(records) == 5 and source.errors == []
    assert all(parse_box(r.answer).box is not None for r in records)
    baselines = baseline_predictions(records, records)
    assert set(baselines) == {"majority_answer", "question_prior", "mean_box"}


# ----------------------------------------------------------------------------------------------- tiling
def _extent(tiles: np.ndarray, rows: int, cols: int) -> tuple[float, float, float, float]:
    """Fractions [x1, y1, x2, y2] of the dark pixels of row-major tiles [rows*cols, 3, S, S] put back together."""
    size = tiles.shape[-1]
    canvas = tiles.reshape(rows, cols, 3, size, size).transpose(0, 3, 1, 4, 2).reshape(rows * size, cols * size, 3)
    ys, xs = np.nonzero(canvas.mean(axis=-1) < 0)  # normalised pixels: dark < 0 < light
    height, width = canvas.shape[:2]
    return xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height


@pytest.mark.parametrize("preset", ["nvila-8b-tiny", "nvila-lite-tiny"])
def test_tiling_keeps_fractions_of_the_original_image(preset):
    """Dynamic-S2 (every scale) and NVILA-Lite tiles (grid and thumbnail) stretch the whole image, without padding
    or cropping: a box at fractions of the original is at the same fractions of what the model sees."""
    from nvila_ft.data.processor import NVILAProcessor
    from nvila_ft.model.checkpoint import read_config
    from nvila_ft.model.pretrained import PRETRAINED_DIR
    from nvila_ft.model.tokenizer import load_tokenizer

    config = read_config(PRETRAINED_DIR / preset)  # the shipped checkpoints' config.json, as finetune reads it
    processor = NVILAProcessor(load_tokenizer(PRETRAINED_DIR / preset / "llm", config.chat_template), config)
    image = Image.new("RGB", (150, 90), "white")  # not square: 5:3
    ImageDraw.Draw(image).rectangle((30, 18, 74, 53), fill="black")  # pixel edges 30..75 x 18..54
    truth = (0.2, 0.2, 0.5, 0.6)
    items = processor.image_items(image, tile=True)
    tile = config.tile_size
    if preset == "nvila-8b-tiny":
        tiles = items[0].tiles.numpy()
        rows, cols = items[0].grid
        grids, start = [(s // tile, s // tile) for s in config.s2_scales[:-1]] + [(rows, cols)], 0
        assert (rows, cols) != (rows, rows)  # the last scale follows the aspect ratio
    else:
        tiles = np.concatenate([item.tiles.numpy() for item in items])
        from nvila_ft.model.media_layout import candidate_grids, closest_grid

        cols, rows = closest_grid(*image.size, candidate_grids(config.min_tiles, config.max_tiles), tile)
        assert len(items) == rows * cols + 1  # the grid, then the whole-image thumbnail
        grids, start = [(rows, cols), (1, 1)], 0
    for rows, cols in grids:
        part = tiles[start : start + rows * cols]
        start += rows * cols
        # one pixel of the resized image either way (bicubic blur at the edges)
        assert _extent(part, rows, cols) == pytest.approx(truth, abs=1.5 / (tile * min(rows, cols))), (rows, cols)
    assert start == len(tiles)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_grounding_example_creates_data_finetunes_evaluates_and_predicts(tmp_path):
    """examples/grounding.sh at toy size: RefCOCO-style records + images, finetune -> evaluate -> predict."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "grounding.sh"
    run = tmp_path / "run"
    env = dict(os.environ, NVILA_FT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable,
               RECORDS="8", STEPS="2", EXTRA="eval.before_training=false trainer.per_device_train_batch_size=4")
    result = subprocess.run(["bash", str(script), str(run)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    refs = json.loads((run / "data" / "train.json").read_text())
    assert len(refs) == 8 and {"image", "sentences", "bbox"} <= set(refs[0])
    finetuned = json.loads((run / "metrics.json").read_text())
    assert finetuned["steps"] == 2 and finetuned["validation_records"] == 4
    assert {"iou_accuracy", "mean_iou", "malformed_box_rate", "count"} == set(finetuned["metrics"]["after_training"])
    assert "mean_box" in finetuned["image_blind_baselines"]
    evaluated = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= evaluated["metrics"]["iou_accuracy"] <= 1.0 and evaluated["metrics"]["count"] == 4
    rows = [json.loads(line) for line in (run / "evaluate" / "predictions.jsonl").read_text().splitlines()]
    assert all(parse_box(row["reference"]).box is not None for row in rows)
    predicted = [json.loads(line) for line in (run / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert len(predicted) == 1 and isinstance(predicted[0]["answer"], str)
