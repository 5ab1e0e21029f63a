"""Built-in datasets: deterministic, in the LLaVA layout, and every answer true of its picture."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nvila_ft.data.conversation import llava_to_messages
from nvila_ft.data.media import load_video
from nvila_ft.domains.general.generators import ANSWERS, QUESTIONS, make_scenes_dataset, make_shapes_dataset
from nvila_ft.domains.medical.generator import make_scan_dataset
from nvila_ft.domains.robotics.generators import make_robot_video_dataset
from nvila_ft.domains.synthetic import COLORS


def _records(json_path: Path) -> list[dict]:
    return json.loads(Path(json_path).read_text())


def _pixels(json_path: Path, record: dict) -> np.ndarray:
    return np.asarray(Image.open(Path(json_path).parent / record["image"]))


def _answer(record: dict) -> str:
    return record["conversations"][1]["value"]


def _foreground(pixels: np.ndarray, threshold: int = 0) -> np.ndarray:
    """Pixels that differ from the top-left corner (always background) by more than `threshold`."""
    difference = np.abs(pixels.astype(int) - pixels[0, 0].astype(int))
    return difference.reshape(*pixels.shape[:2], -1).sum(-1) > threshold


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, columns = np.nonzero(mask)
    return float(rows.mean()), float(columns.mean())


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "data", 240, seed=3)


def test_shapes_layout_and_counts(shapes):
    records = _records(shapes)
    assert len(records) == 240
    assert shapes.name == "data.json"
    assert json.loads((shapes.parent / "answers.json").read_text()) == {
        "color": ["red", "green", "blue", "yellow"],
        "position": ["top left", "top right", "bottom left", "bottom right"],
        "shape": ["circle", "square", "triangle"],
    }
    for index, record in enumerate(records):
        assert record["id"] == f"shapes-{index:06d}"
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": f"<image>\n{QUESTIONS[record['question_type']]}"}
        assert gpt["from"] == "gpt" and gpt["value"] in ANSWERS[record["question_type"]]
        assert (shapes.parent / record["image"]).is_file()
    # Each question type is asked, and the project's own LLaVA reader takes the records as they are.
    assert {r["question_type"] for r in records} == {"color", "position", "shape"}
    messages = llava_to_messages(records[0])
    assert messages[0]["content"][0] == {"type": "image", "image": records[0]["image"]}
    assert messages[1]["content"] == [{"type": "text", "text": _answer(records[0])}]


def test_palette_is_saturated_and_separable():
    colors = [np.array(c) for c in COLORS.values()]
    assert min(np.abs(a - b).sum() for i, a in enumerate(colors) for b in colors[i + 1 :]) > 200
    assert all(c.min() < 50 for c in colors)  # never close to a light (>= 235) background


def test_shapes_answers_match_the_pixels(shapes):
    # Each question type only reveals one attribute, so check every answer against the picture.
    fill_ratio = {"square": (0.95, 1.0), "circle": (0.72, 0.86), "triangle": (0.42, 0.62)}
    for record in _records(shapes):
        pixels = _pixels(shapes, record)
        assert pixels.shape == (64, 64, 3)
        mask = _foreground(pixels)
        row, column = _centroid(mask)
        answer, kind = _answer(record), record["question_type"]
        if kind == "color":
            centre = pixels[round(row), round(column)]
            assert tuple(centre) == COLORS[answer]
            assert np.all(pixels[mask] == COLORS[answer])
        elif kind == "position":
            vertical, horizontal = answer.split()
            assert (row < 32) == (vertical == "top") and (column < 32) == (horizontal == "left")
            # The whole shape is in its quadrant, not only its centroid.
            rows, columns = np.nonzero(mask)
            assert len({r < 32 for r in rows}) == 1 and len({c < 32 for c in columns}) == 1
        else:
            rows, columns = np.nonzero(mask)
            box = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
            low, high = fill_ratio[answer]
            assert low <= mask.sum() / box <= high, (record["id"], answer, mask.sum() / box)


def test_shapes_are_deterministic_and_prefix_stable(shapes, tmp_path):
    again = make_shapes_dataset(tmp_path / "again", 240, seed=3)
    assert again.read_bytes() == shapes.read_bytes()
    for record in _records(shapes)[:20]:
        assert np.array_equal(_pixels(again, record), _pixels(shapes, record))
    shorter = _records(make_shapes_dataset(tmp_path / "short", 10, seed=3))
    assert shorter == _records(shapes)[:10]
    other = make_shapes_dataset(tmp_path / "other", 240, seed=4)
    assert other.read_bytes() != shapes.read_bytes()


def test_shapes_are_fast(tmp_path):
    start = time.perf_counter()
    make_shapes_dataset(tmp_path / "many", 1000)
    assert time.perf_counter() - start < 5


def test_question_subset_and_argument_checks(tmp_path):
    path = make_shapes_dataset(tmp_path / "color", 20, questions=("color",), image_size=32)
    assert {r["question_type"] for r in _records(path)} == {"color"}
    assert json.loads((path.parent / "answers.json").read_text()) == {"color": ["red", "green", "blue", "yellow"]}
    assert _pixels(path, _records(path)[0]).shape == (32, 32, 3)
    with pytest.raises(ValueError, match="unknown question"):
        make_shapes_dataset(tmp_path / "bad", 5, questions=("size",))
    with pytest.raises(ValueError, match="num_records"):
        make_shapes_dataset(tmp_path / "bad", 0)
    with pytest.raises(ValueError, match="image_size"):
        make_scan_dataset(tmp_path / "bad", 5, image_size=16)


def test_manifest_reuse_and_regeneration(tmp_path, monkeypatch):
    out = tmp_path / "shapes"
    path = make_shapes_dataset(out, 12, seed=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["params"]["seed"] == 1 and manifest["generator"] == "shapes"

    # Same parameters: nothing is drawn again.
    def no_drawing(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    with monkeypatch.context() as patch:
        patch.setattr("nvila_ft.domains.general.generators.save_png", no_drawing)
        assert make_shapes_dataset(out, 12, seed=1) == path

    # Different parameters, or an incomplete dataset (a missing image), are regenerated.
    assert len(_records(make_shapes_dataset(out, 15, seed=1))) == 15
    (out / _records(path)[3]["image"]).unlink()
    make_shapes_dataset(out, 15, seed=1)
    assert (out / _records(path)[3]["image"]).is_file()
    # A stale manifest from an interrupted run is not trusted.
    (out / "manifest.json").unlink()
    make_shapes_dataset(out, 15, seed=1)
    assert json.loads((out / "manifest.json").read_text())["count"] == 15


def test_scan_lesion_present_iff_yes_and_on_its_side(tmp_path):
    path = make_scan_dataset(tmp_path / "scan", 120, seed=5)
    records = _records(path)
    assert path.read_bytes() == make_scan_dataset(tmp_path / "again", 120, seed=5).read_bytes()
    answers = {kind: [_answer(r) for r in records if r["question_type"] == kind] for kind in ("lesion", "side")}
    assert set(answers["lesion"]) == {"yes", "no"} and set(answers["side"]) == {"left", "right"}
    for record in records:
        pixels = _pixels(path, record)
        assert pixels.shape == (64, 64) and pixels.dtype == np.uint8
        lesion = pixels > 200
        # Nothing but a lesion comes near the threshold: body and outline stay <= 175, a lesion >= 215.
        assert not np.any((pixels > 175) & (pixels < 215))
        if record["question_type"] == "lesion":
            assert lesion.any() == (_answer(record) == "yes"), record["id"]
        else:
            assert lesion.sum() >= 9
            columns = np.nonzero(lesion)[1]
            side = "left" if columns.max() < 32 else "right" if columns.min() >= 32 else "both"
            assert side == _answer(record), record["id"]


def test_robot_video_direction_matches_motion(tmp_path):
    path = make_robot_video_dataset(tmp_path / "robot", 12, seed=2, frames=16, size=48)
    records = _records(path)
    assert len(records) == 12
    assert {r["question_type"] for r in records} == {"direction"}
    assert make_robot_video_dataset(tmp_path / "again", 12, seed=2).read_bytes() == path.read_bytes()
    seen = set()
    for record in records:
        assert "image" not in record and record["video"].endswith(".mp4")
        assert record["conversations"][0]["value"] == "<video>\nWhich way does the block move?"
        frames = load_video(path.parent / record["video"], num_frames=16)
        assert len(frames) == 16 and frames[0].size == (48, 48)
        first, last = (_centroid(_foreground(np.asarray(f), threshold=150)) for f in (frames[0], frames[-1]))
        d_row, d_column = last[0] - first[0], last[1] - first[1]
        if abs(d_column) > abs(d_row):
            moved = "right" if d_column > 0 else "left"
        else:
            moved = "down" if d_row > 0 else "up"
        assert moved == _answer(record), record["id"]
        assert max(abs(d_row), abs(d_column)) >= 8
        seen.add(moved)
    assert len(seen) >= 3



def test_scenes_answers_are_true_of_their_picture(tmp_path):
    path = make_scenes_dataset(tmp_path / "scenes", 150, seed=4)
    records = _records(path)
    assert path.read_bytes() == make_scenes_dataset(tmp_path / "again", 150, seed=4).read_bytes()
    assert {r["question_type"] for r in records} == {"count", "exists", "color_at", "shape_at", "where", "describe"}
    exists = [_answer(r) for r in records if r["question_type"] == "exists"]
    assert 0.3 < exists.count("yes") / len(exists) < 0.7  # balanced presence questions
    for record in records:
        pixels = _pixels(path, record)
        quadrants = {
            "top left": pixels[:32, :32], "top right": pixels[:32, 32:],
            "bottom left": pixels[32:, :32], "bottom right": pixels[32:, 32:],
        }
        # which palette colour fills each quadrant (shapes are drawn without anti-aliasing)
        found = {}
        for place, block in quadrants.items():
            for name, rgb in COLORS.items():
                if (block.reshape(-1, 3) == rgb).all(axis=1).sum() >= 20:
                    found[place] = name
        question, answer, kind = record["conversations"][0]["value"], _answer(record), record["question_type"]
        if kind == "count":
            assert answer == ("one", "two", "three")[len(found) - 1], record["id"]
        elif kind == "color_at":
            place = question.split("in the ")[1].rstrip("?")
            assert found[place] == answer, record["id"]
        elif kind == "where":
            assert found[answer] == question.split("Where is the ")[1].split()[0], record["id"]
        elif kind == "exists":
            colour = question.split("Is there a ")[1].split()[0]
            assert (answer == "yes") <= (colour in found.values()), record["id"]
        elif kind == "describe":
            described = dict(part.split(" in the ") for part in answer.removeprefix("a ").split(" and a "))
            assert {place: described_kind.split()[0] for described_kind, place in described.items()} == found, record["id"]


def test_robot_video_can_ask_the_block_colour(tmp_path):
    path = make_robot_video_dataset(tmp_path / "robot", 16, seed=2, frames=4, questions=("direction", "block_color"))
    records = _records(path)
    assert {r["question_type"] for r in records} == {"direction", "block_color"}
    for record in records:
        if record["question_type"] == "block_color":
            frame = np.asarray(load_video(path.parent / record["video"], num_frames=1)[0]).reshape(-1, 3).astype(int)
            distance = {name: np.abs(frame - np.array(rgb)).sum(axis=1).min() for name, rgb in COLORS.items()}
            assert min(distance, key=distance.get) == _answer(record), record["id"]
    # the default asks only the direction, with the same parameters (and cache) as before
    assert "questions" not in json.loads((make_robot_video_dataset(tmp_path / "d", 2)).parent.joinpath("manifest.json").read_text())["params"]
