"""Built-in multimodal datasets, drawn from a seed and written in the official LLaVA JSON layout.

They are the demo's default task: a tiny randomly initialised NVILA (32 px tiles, 8 px patches) must learn
them on a CPU in minutes. So each answer depends on the image through a feature a tiny model picks up
quickly (a saturated colour, a quadrant, a bright blob, a direction of motion), every question has a small
closed answer set (so `accuracy` is meaningful and chance level is known), and the picture's attributes are
drawn independently of the question asked, so the model has to read the question too.

Each generator writes into `out_dir`:
    data.json      [{"id", "image" | "video", "conversations": [human "<image>\\n<question>", gpt "<answer>"],
                     "question_type"}]  (media paths relative to `out_dir`; "question_type" is an extra key
                     the LLaVA loader ignores)
    images/ or videos/   the media
    answers.json   {question_type: [every possible answer]}
    manifest.json  the generator, its parameters and the record count; written last, so its presence means
                   the dataset is complete and a second call with the same parameters reuses it.

Record `i` is drawn from its own generator seeded with (seed, i), so a smaller dataset is a prefix of a
larger one with the same seed, and the same seed gives byte-identical JSON and identical pixels.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nvila_ft.atomic import atomic_write_json
from nvila_ft.data.boxes import GROUNDING_PROMPT, box_from_pixels, format_box

# Bump when a generator's output changes, so that datasets cached by an older version are regenerated.
GENERATOR_VERSION = 1

# Saturated and far apart in RGB, and each has a channel below 50, so none is mistaken for a light background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
DIRECTIONS = ("left", "right", "up", "down")
COUNTS = ("one", "two", "three")

QUESTIONS: dict[str, str] = {
    "color": "What color is the shape?",
    "position": "Where is the shape?",
    "shape": "What shape is it?",
    "lesion": "Is there a lesion?",
    "side": "Which side is the lesion on?",
    "direction": "Which way does the block move?",
    "block_color": "What color is the block?",
    "count": "How many shapes are there?",
    "exists": "Is there a {color} {shape}?",
    "color_at": "What color is the shape in the {position}?",
    "shape_at": "What shape is in the {position}?",
    "where": "Where is the {color} {shape}?",
    "describe": "Describe the image.",
    "ground": GROUNDING_PROMPT,
}
ANSWERS: dict[str, list[str]] = {
    "color": list(COLORS),
    "position": list(POSITIONS),
    "shape": list(SHAPES),
    "lesion": ["yes", "no"],
    "side": list(SIDES),
    "direction": list(DIRECTIONS),
    "block_color": list(COLORS),
    "count": list(COUNTS),
    "exists": ["yes", "no"],
    "color_at": list(COLORS),
    "shape_at": list(SHAPES),
    "where": list(POSITIONS),
}  # "describe" has free-text answers, "ground" boxes

DATA_FILE, ANSWERS_FILE, MANIFEST_FILE = "data.json", "answers.json", "manifest.json"


def make_shapes_dataset(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int = 0,
    image_size: int = 64,
    questions: Sequence[str] = ("color", "position", "shape"),
) -> Path:
    """One filled circle/square/triangle in one of 4 colours in one quadrant of a light background.

    Each record asks one question, picked uniformly from `questions`: "What color is the shape?" -> "red",
    "Where is the shape?" -> "top left", "What shape is it?" -> "circle". The shape spans 50-80% of a quadrant
    and lies wholly inside it, with jittered placement; the background is one light tint per image (every
    channel 235-255). Shapes are drawn without anti-aliasing, so their pixels are exactly `COLORS[answer]`.
    Returns the path of data.json.
    """
    questions = _check_questions(questions, ("color", "position", "shape"))
    _check_at_least("num_records", num_records, 1)
    _check_at_least("image_size", image_size, 16)
    params = {"num_records": num_records, "seed": seed, "image_size": image_size, "questions": list(questions)}

    def record(rng: np.random.Generator, index: int) -> tuple[dict[str, Any], Image.Image]:
        color, position, shape = (str(rng.choice(v)) for v in (list(COLORS), POSITIONS, SHAPES))
        question = str(rng.choice(questions))
        answer = {"color": color, "position": position, "shape": shape}[question]
        background = tuple(int(c) for c in rng.integers(235, 256, size=3))
        image = Image.new("RGB", (image_size, image_size), background)
        _draw_shape(ImageDraw.Draw(image), shape, _box_in_quadrant(rng, image_size, position), COLORS[color])
        return _llava_record("shapes", index, "image", question, answer), image

    return _build(out_dir, "shapes", params, questions, record, _save_png)


def make_scenes_dataset(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int = 0,
    image_size: int = 64,
    questions: Sequence[str] = ("count", "exists", "color_at", "shape_at", "where", "describe"),
) -> Path:
    """One to three shapes, each in its own quadrant, on a light or a dark background: the broad image part of
    the tiny models' pretraining mixture (counting, presence, attributes at a place, places of an object, and a
    one-line description).

    "How many shapes are there?" -> "two"; "Is there a red circle?" -> "yes"/"no" (balanced: half ask about
    an object that is there); "What color is the shape in the top left?" / "What shape is in the top left?"
    name an occupied quadrant; "Where is the blue square?" names an object that is there; "Describe the image."
    -> "a red circle in the top left and a blue square in the bottom right" (quadrants in reading order).
    No two shapes share both colour and shape, so every question has one answer. Returns the path of data.json.
    """
    questions = _check_questions(questions, ("count", "exists", "color_at", "shape_at", "where", "describe"))
    _check_at_least("num_records", num_records, 1)
    _check_at_least("image_size", image_size, 32)
    params = {"num_records": num_records, "seed": seed, "image_size": image_size, "questions": list(questions)}
    kinds = [(c, s) for c in COLORS for s in SHAPES]

    def record(rng: np.random.Generator, index: int) -> tuple[dict[str, Any], Image.Image]:
        count = int(rng.integers(1, 4))
        places = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
        objects = {POSITIONS[p]: kinds[k] for p, k in zip(places, rng.choice(len(kinds), size=count, replace=False))}
        light = bool(rng.integers(2))
        background = tuple(int(c) for c in rng.integers(*((235, 256) if light else (15, 61)), size=3))
        image = Image.new("RGB", (image_size, image_size), background)
        draw = ImageDraw.Draw(image)
        for position, (color, shape) in objects.items():
            _draw_shape(draw, shape, _box_in_quadrant(rng, image_size, position), COLORS[color])

        question_type = str(rng.choice(questions))
        fields: dict[str, str] = {}
        if question_type == "count":
            answer = COUNTS[count - 1]
        elif question_type == "exists":
            present = bool(rng.integers(2))
            absent = [k for k in kinds if k not in objects.values()]
            color, shape = objects[str(rng.choice(list(objects)))] if present else absent[int(rng.integers(len(absent)))]
            fields, answer = {"color": color, "shape": shape}, "yes" if present else "no"
        elif question_type in ("color_at", "shape_at"):
            position = str(rng.choice(list(objects)))
            fields = {"position": position}
            answer = objects[position][0 if question_type == "color_at" else 1]
        elif question_type == "where":
            position = str(rng.choice(list(objects)))
            fields, answer = dict(zip(("color", "shape"), objects[position])), position
        else:
            answer = " and ".join(f"a {c} {s} in the {p}" for p, (c, s) in objects.items())
        return _llava_record("scenes", index, "image", question_type, answer, fields), image

    return _build(out_dir, "scenes", params, questions, record, _save_png)


def make_scan_dataset(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int = 0,
    image_size: int = 64,
    questions: Sequence[str] = ("lesion", "side"),
) -> Path:
    """A synthetic greyscale "scan": a noisy elliptical body with, or without, one bright round lesion.

    The question type is picked uniformly from `questions`. "Is there a lesion?" -> "yes"/"no" (a lesion is
    drawn with probability 1/2, so answers are balanced); "Which side is the lesion on?" -> "left"/"right"
    is asked only of images that have one. Sides are as seen in the image (viewer's left), not the
    radiological patient-side convention. Intensities are bounded: background 0-50, body at most 150, body
    outline at most 175, lesion at least 215, so a lesion is exactly the set of pixels above 200.
    Returns the path of data.json.
    """
    questions = _check_questions(questions, ("lesion", "side"))
    _check_at_least("num_records", num_records, 1)
    _check_at_least("image_size", image_size, 32)
    params = {"num_records": num_records, "seed": seed, "image_size": image_size, "questions": list(questions)}

    def record(rng: np.random.Generator, index: int) -> tuple[dict[str, Any], Image.Image]:
        question = str(rng.choice(questions))
        present = question == "side" or bool(rng.integers(2))
        side = str(rng.choice(SIDES))
        answer = side if question == "side" else ("yes" if present else "no")

        size = image_size
        scan = Image.new("L", (size, size), 25)
        draw = ImageDraw.Draw(scan)
        # The body: an ellipse leaving a 2-4 px margin, its outline a bit brighter than its inside.
        margin_x, margin_y = (int(m) for m in rng.integers(2, 5, size=2))
        body = (margin_x, margin_y + size // 8, size - 1 - margin_x, size - 1 - margin_y - size // 8)
        draw.ellipse(body, fill=int(rng.integers(100, 121)), outline=150, width=2)
        if present:
            radius = int(rng.integers(max(size // 16, 2), size // 9 + 1))
            # The lesion sits wholly in its half and inside the body's central band.
            half = size // 2
            low, high = (body[0] + radius + 4, half - radius - 2) if side == "left" else (half + radius + 1, body[2] - radius - 4)
            cx = int(rng.integers(low, high + 1))
            cy = int(rng.integers(size // 2 - size // 8, size // 2 + size // 8 + 1))
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=235)
        pixels = np.asarray(scan, dtype=np.int16) + rng.integers(-20, 21, size=(size, size), dtype=np.int16)
        # Noise of +-20 keeps each band inside the documented range; clipping only guards uint8.
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
        return _llava_record("scan", index, "image", question, answer), Image.fromarray(pixels, mode="L")

    return _build(out_dir, "scan", params, questions, record, _save_png)


def make_robot_video_dataset(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int = 0,
    frames: int = 16,
    size: int = 48,
    fps: int = 8,
    questions: Sequence[str] = ("direction",),
) -> Path:
    """Short H.264 clips of a coloured block sliding left, right, up or down over a dark background.

    "Which way does the block move?" -> "left"/"right"/"up"/"down". The block travels 40-60% of the free
    span in a straight line at constant speed from a random start, so where it starts does not give the
    direction away: the model has to compare frames. With "block_color" among `questions`, some records ask
    "What color is the block?" instead. Returns the path of data.json.
    """
    questions = _check_questions(questions, ("direction", "block_color"))
    _check_at_least("num_records", num_records, 1)
    _check_at_least("frames", frames, 2)
    _check_at_least("size", size, 16)
    params = {"num_records": num_records, "seed": seed, "frames": frames, "size": size, "fps": fps}
    if questions != ("direction",):  # the default keeps the parameters (and so the cache) of earlier versions
        params["questions"] = list(questions)

    def record(rng: np.random.Generator, index: int) -> tuple[dict[str, Any], list[Image.Image]]:
        direction = str(rng.choice(DIRECTIONS))
        color_name = str(rng.choice(list(COLORS)))
        color = COLORS[color_name]
        background = int(rng.integers(25, 61))
        block = int(rng.integers(size // 6, size // 4 + 1))
        lowest, highest = 2, size - block - 2  # block's top-left corner stays 2 px inside the frame
        travel = int(rng.integers(int(0.4 * (highest - lowest)), int(0.6 * (highest - lowest)) + 1))
        start = int(rng.integers(lowest, highest - travel + 1))
        along = np.linspace(start, start + travel, frames)
        if direction in ("left", "up"):
            along = along[::-1]
        across = int(rng.integers(lowest, highest + 1))
        clip = []
        for position in np.round(along).astype(int).tolist():
            x, y = (position, across) if direction in ("left", "right") else (across, position)
            frame = Image.new("RGB", (size, size), (background,) * 3)
            ImageDraw.Draw(frame).rectangle((x, y, x + block - 1, y + block - 1), fill=color)
            clip.append(frame)
        question = str(rng.choice(questions)) if len(questions) > 1 else "direction"
        answer = direction if question == "direction" else color_name
        return _llava_record("robot", index, "video", question, answer), clip

    def save(clip: list[Image.Image], path: Path) -> None:
        from nvila_ft.data.media import write_video

        write_video(clip, path, fps=fps)

    return _build(out_dir, "robot_video", params, questions, record, save)


def make_grounding_dataset(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int = 0,
    image_size: int = 64,
    grid: int = 3,
    max_objects: int = 3,
    questions: Sequence[str] = ("ground",),
) -> Path:
    """Referring-expression grounding: two to `max_objects` shapes of different colours, each in its own cell of a
    `grid` x `grid` layout on a light background; "Please provide the bounding box coordinate of the region this
    sentence describes: the red circle." -> "[0.05, 0.36, 0.30, 0.61]" (`nvila_ft.data.boxes`' format).

    Each shape fills 70-90% of its cell's side, placed with jitter, so a model that finds the right cell and
    answers that cell's typical box already reaches IoU >= 0.5, and exact edges earn more. The answer is the
    shape's tight pixel box (circles, squares and triangles all touch the four sides of the square they are
    drawn in). Returns the path of data.json.
    """
    questions = _check_questions(questions, ("ground",))
    _check_at_least("num_records", num_records, 1)
    _check_at_least("grid", grid, 1)
    _check_at_least("image_size", image_size, 8 * grid)
    _check_at_least("max_objects", max_objects, 1)
    if max_objects > min(len(COLORS), grid * grid):
        raise ValueError(f"max_objects must be at most {min(len(COLORS), grid * grid)} (one colour and one cell each)")
    params = {"num_records": num_records, "seed": seed, "image_size": image_size, "grid": grid, "max_objects": max_objects}

    def record(rng: np.random.Generator, index: int) -> tuple[dict[str, Any], Image.Image]:
        count = int(rng.integers(min(2, max_objects), max_objects + 1))
        cells = rng.choice(grid * grid, size=count, replace=False).tolist()
        colors = rng.choice(list(COLORS), size=count, replace=False).tolist()
        background = tuple(int(c) for c in rng.integers(235, 256, size=3))
        image = Image.new("RGB", (image_size, image_size), background)
        draw = ImageDraw.Draw(image)
        objects = []
        for cell, color in zip(cells, colors):
            shape = str(rng.choice(SHAPES))
            box = _box_in_cell(rng, image_size, grid, cell)
            _draw_shape(draw, shape, box, COLORS[str(color)])
            objects.append((str(color), shape, box))
        color, shape, (left, top, right, bottom) = objects[int(rng.integers(count))]
        answer = format_box(box_from_pixels([left, top, right + 1, bottom + 1], image_size, image_size, "xyxy"))
        return _llava_record("grounding", index, "image", "ground", answer, {"expression": f"the {color} {shape}"}), image

    return _build(out_dir, "grounding", params, questions, record, _save_png)


def make_preference_dataset(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int = 0,
    source: str = "scan",
    image_size: int = 64,
) -> Path:
    """Preference pairs over a built-in question-answer dataset (`source`: scan or shapes): each record keeps the
    question and its media, with the right answer as `chosen` and one of the question type's wrong answers (drawn
    uniformly) as `rejected`, in the LLaVA preference layout of `nvila_ft.data.preferences`:
    {"id", "image", "conversations": [human "<image>\\n<question>"], "chosen", "rejected", "question_type"}.

    The source dataset is written into `out_dir/source` by its own generator; data.json refers to its images.
    Returns the path of data.json.
    """
    if source not in ("scan", "shapes"):
        raise ValueError(f"source must be 'scan' or 'shapes' (closed answer sets), got {source!r}")
    _check_at_least("num_records", num_records, 1)
    out_dir = Path(out_dir)
    data_path = out_dir / DATA_FILE
    params = {"num_records": num_records, "seed": seed, "source": source, "image_size": image_size}
    manifest = {"generator": "preference", "version": GENERATOR_VERSION, "params": params, "count": num_records}
    if _is_complete(out_dir, manifest):
        return data_path
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    base = BUILTIN_DATASETS[source](out_dir / "source", num_records, seed=seed, image_size=image_size)
    records = []
    for index, record in enumerate(json.loads(base.read_text())):
        question, answer = record["conversations"]
        wrong = [a for a in ANSWERS[record["question_type"]] if a != answer["value"]]
        rng = np.random.default_rng([seed, index, 1])  # apart from the source's own draws for this record
        records.append({
            "id": record["id"],
            "image": f"source/{record['image']}",
            "conversations": [question],
            "chosen": answer["value"],
            "rejected": wrong[int(rng.integers(len(wrong)))],
            "question_type": record["question_type"],
        })
    atomic_write_json(data_path, records)
    atomic_write_json(out_dir / ANSWERS_FILE, json.loads((base.parent / ANSWERS_FILE).read_text()))
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return data_path


BUILTIN_DATASETS: dict[str, Callable[..., Path]] = {
    "shapes": make_shapes_dataset,
    "scan": make_scan_dataset,
    "robot_video": make_robot_video_dataset,
    "scenes": make_scenes_dataset,
    "grounding": make_grounding_dataset,
    "preference": make_preference_dataset,
}


def _check_questions(questions: Sequence[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    questions = (questions,) if isinstance(questions, str) else tuple(questions)
    if not questions:
        raise ValueError(f"questions must name at least one of {list(allowed)}")
    unknown = [q for q in questions if q not in allowed]
    if unknown:
        raise ValueError(f"unknown question type(s) {unknown}; choose from {list(allowed)}")
    return questions


def _check_at_least(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _llava_record(
    prefix: str, index: int, kind: str, question_type: str, answer: str, fields: dict[str, str] | None = None
) -> dict[str, Any]:
    folder, suffix = ("images", "png") if kind == "image" else ("videos", "mp4")
    return {
        "id": f"{prefix}-{index:06d}",
        kind: f"{folder}/{prefix}_{index:06d}.{suffix}",
        "conversations": [
            {"from": "human", "value": f"<{kind}>\n{QUESTIONS[question_type].format(**(fields or {}))}"},
            {"from": "gpt", "value": answer},
        ],
        "question_type": question_type,
    }


def _box_in_quadrant(rng: np.random.Generator, image_size: int, position: str) -> tuple[int, int, int, int]:
    """A square spanning 50-80% of a quadrant ("top left", ...), with jittered placement, at least 1 px from the
    image border and from the quadrant's inner edges."""
    quadrant = image_size // 2
    extent = int(rng.integers(quadrant // 2, int(quadrant * 0.8) + 1))
    left = int(rng.integers(1, max(quadrant - extent - 1, 1) + 1))
    top = int(rng.integers(1, max(quadrant - extent - 1, 1) + 1))
    row, column = position.split()
    left += quadrant if column == "right" else 0
    top += quadrant if row == "bottom" else 0
    return left, top, left + extent - 1, top + extent - 1


def _box_in_cell(rng: np.random.Generator, image_size: int, grid: int, cell: int) -> tuple[int, int, int, int]:
    """A square spanning 70-90% of the side of cell `cell` (row-major) of a `grid` x `grid` layout, with
    jittered placement, wholly inside the cell; inclusive pixel corners (left, top, right, bottom)."""
    row, column = divmod(cell, grid)
    x0, x1 = column * image_size // grid, (column + 1) * image_size // grid
    y0, y1 = row * image_size // grid, (row + 1) * image_size // grid
    side = min(x1 - x0, y1 - y0)
    extent = int(rng.integers(int(round(side * 0.7)), int(side * 0.9) + 1))
    left = x0 + int(rng.integers(0, x1 - x0 - extent + 1))
    top = y0 + int(rng.integers(0, y1 - y0 - extent + 1))
    return left, top, left + extent - 1, top + extent - 1


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    """A filled circle, square or (upward) triangle inside `box`, without anti-aliasing."""
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")


def _build(
    out_dir: str | os.PathLike,
    generator: str,
    params: dict[str, Any],
    question_types: Sequence[str],
    make_record: Callable[[np.random.Generator, int], tuple[dict[str, Any], Any]],
    save_media: Callable[[Any, Path], None],
) -> Path:
    """Write (or reuse) a dataset: media first, then data.json and answers.json, then the manifest."""
    out_dir = Path(out_dir)
    data_path = out_dir / DATA_FILE
    manifest = {"generator": generator, "version": GENERATOR_VERSION, "params": params, "count": params["num_records"]}
    if _is_complete(out_dir, manifest):
        return data_path

    # Without a manifest, an interrupted run below is never mistaken for a complete dataset.
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    records = []
    for index in range(params["num_records"]):
        rng = np.random.default_rng([params["seed"], index])
        record, media = make_record(rng, index)
        relative = record.get("image") or record["video"]
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        save_media(media, path)
        records.append(record)
    atomic_write_json(data_path, records)
    atomic_write_json(out_dir / ANSWERS_FILE, {q: ANSWERS[q] for q in question_types if q in ANSWERS})
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return data_path


def _is_complete(out_dir: Path, manifest: dict[str, Any], data_file: str = DATA_FILE, with_answers: bool = True) -> bool:
    """Whether `out_dir` holds the dataset `manifest` describes: the same manifest, all its entries, their media
    (an entry's "image" or "video": a file, or a frame folder) and, for question-answer sets, answers.json."""
    try:
        if json.loads((out_dir / MANIFEST_FILE).read_text()) != manifest:
            return False
        entries = json.loads((out_dir / data_file).read_text())
    except (OSError, ValueError):
        return False
    if len(entries) != manifest["count"] or (with_answers and not (out_dir / ANSWERS_FILE).is_file()):
        return False
    return all((media := e.get("image") or e.get("video")) and (out_dir / media).exists() for e in entries)


def default_cache_dir() -> Path:
    """Where built-in datasets are written: $NVILA_FT_CACHE, else ~/.cache/nvila-ft."""
    return Path(os.environ.get("NVILA_FT_CACHE", Path.home() / ".cache" / "nvila-ft")) / "builtin"


class BuiltinData:
    """A built-in dataset as a task's data source: generated once into a cache folder, then read by the same
    LLaVA JSON reader as user data. `options` go to the generator (image_size, questions, frames, ...)."""

    def __init__(
        self,
        dataset: str = "shapes",
        num_records: int = 1000,
        seed: int = 0,
        cache_dir: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        if dataset not in BUILTIN_DATASETS:
            raise ValueError(f"unknown built-in dataset {dataset!r} (known: {', '.join(BUILTIN_DATASETS)})")
        self.dataset, self.num_records, self.seed = dataset, num_records, seed
        self.cache_dir, self.options = cache_dir, dict(options or {})
        self.errors: list[Any] = []

    def path(self) -> Path:
        options = re.sub(r"[^A-Za-z0-9=.,-]+", "_", "-".join(f"{k}={v}" for k, v in sorted(self.options.items())))
        name = f"{self.dataset}-n{self.num_records}-seed{self.seed}" + (f"-{options}" if options else "")
        root = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        return BUILTIN_DATASETS[self.dataset](root / name, self.num_records, seed=self.seed, **self.options)

    def records(self) -> list:
        from nvila_ft.data.preferences import PreferenceJson
        from nvila_ft.data.sources import LlavaJson

        reader = PreferenceJson if self.dataset == "preference" else LlavaJson
        source = reader(str(self.path()))
        records = source.records()
        self.errors = source.errors
        return records


# ----------------------------------------------------------------------------------------------- robot episodes
EPISODES_FILE = "episodes.json"
MOVES = {(1, 0): "move right", (-1, 0): "move left", (0, 1): "move up", (0, -1): "move down", (0, 0): "grasp"}


def make_robot_episodes_dataset(
    out_dir: str | os.PathLike,
    num_episodes: int = 300,
    seed: int = 0,
    grid: int = 4,
    cell: int = 8,
    media: str = "frames",
    fps: int = 4,
) -> Path:
    """Pick-up episodes in a `grid` x `grid` world, written in the native episodes layout (`nvila_ft.data.episodes`).

    A coloured block sits in one cell; a white gripper (a hollow square) starts in another and moves one cell a
    step, first along x until it is in the block's column, then along y, then grasps. Frame i shows the scene
    before step i's action, so every action is decidable from the step's last frame: x = sign(block column -
    gripper column) (+1 = right), y = sign(gripper row - block row) once the columns agree (+1 = up), grip
    "close" on the block. Each step has a "subgoal", an "action" {x, y, grip} and an "action_text" ("move left",
    ..., "grasp"). `media`: "frames" (a folder of PNGs per episode) or "mp4". Returns the path of episodes.json.
    """
    _check_at_least("num_episodes", num_episodes, 1)
    _check_at_least("grid", grid, 2)
    _check_at_least("cell", cell, 4)
    if media not in ("frames", "mp4"):
        raise ValueError(f"media must be 'frames' or 'mp4', got {media!r}")
    out_dir = Path(out_dir)
    data_path = out_dir / EPISODES_FILE
    params = {"num_episodes": num_episodes, "seed": seed, "grid": grid, "cell": cell, "media": media, "fps": fps}
    manifest = {"generator": "robot_episodes", "version": GENERATOR_VERSION, "params": params, "count": num_episodes}
    if _is_complete(out_dir, manifest, EPISODES_FILE, with_answers=False):
        return data_path
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    episodes = []
    for index in range(num_episodes):
        rng = np.random.default_rng([seed, index])
        color_name = str(rng.choice(list(COLORS)))
        cells = rng.choice(grid * grid, size=2, replace=False)
        block, gripper = divmod(int(cells[0]), grid), divmod(int(cells[1]), grid)  # (row, column)
        background = int(rng.integers(25, 61))
        frames, steps = [], []
        while True:
            frames.append(_episode_frame(grid, cell, background, COLORS[color_name], block, gripper))
            dx = int(np.sign(block[1] - gripper[1]))
            dy = 0 if dx else int(np.sign(gripper[0] - block[0]))
            on_block = gripper == block
            steps.append({
                "frame": len(frames) - 1,
                "subgoal": "grasp the block" if on_block else "line up with the block" if dx else "reach the block",
                "action": {"x": dx, "y": dy, "grip": "close" if on_block else "open"},
                "action_text": MOVES[(dx, dy)],
            })
            if on_block:
                break
            gripper = (gripper[0] - dy, gripper[1] + dx)
        name = f"episodes/ep_{index:06d}"
        if media == "mp4":
            from nvila_ft.data.media import write_video

            (out_dir / "episodes").mkdir(parents=True, exist_ok=True)
            write_video(frames, out_dir / f"{name}.mp4", fps=fps)
            name += ".mp4"
        else:
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            for k, frame in enumerate(frames):
                _save_png(frame, out_dir / name / f"frame_{k:04d}.png")
        episodes.append({"episode_id": f"pick-{index:06d}", "video": name,
                         "instruction": f"Pick up the {color_name} block.", "steps": steps})
    atomic_write_json(data_path, episodes)
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return data_path


def _episode_frame(grid: int, cell: int, background: int, color: tuple[int, int, int],
                   block: tuple[int, int], gripper: tuple[int, int]) -> Image.Image:
    frame = Image.new("RGB", (grid * cell, grid * cell), (background,) * 3)
    draw = ImageDraw.Draw(frame)
    row, column = block
    draw.rectangle((column * cell + 1, row * cell + 1, column * cell + cell - 2, row * cell + cell - 2), fill=color)
    row, column = gripper
    width = max(cell // 4, 1)
    draw.rectangle((column * cell, row * cell, column * cell + cell - 1, row * cell + cell - 1),
                   outline=(255, 255, 255), width=width)
    return frame
