"""Built-in shapes and scenes: the domain-free synthetic sets of the demo and the tiny models' pretraining mixture."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nvila_ft.domains.synthetic import (
    COLORS,
    POSITIONS,
    SHAPES,
    box_in_quadrant,
    build_dataset,
    check_at_least,
    check_questions,
    draw_shape,
    llava_entry,
    save_png,
)

COUNTS = ("one", "two", "three")
QUESTIONS: dict[str, str] = {
    "color": "What color is the shape?",
    "position": "Where is the shape?",
    "shape": "What shape is it?",
    "count": "How many shapes are there?",
    "exists": "Is there a {color} {shape}?",
    "color_at": "What color is the shape in the {position}?",
    "shape_at": "What shape is in the {position}?",
    "where": "Where is the {color} {shape}?",
    "describe": "Describe the image.",
}
ANSWERS: dict[str, list[str]] = {
    "color": list(COLORS),
    "position": list(POSITIONS),
    "shape": list(SHAPES),
    "count": list(COUNTS),
    "exists": ["yes", "no"],
    "color_at": list(COLORS),
    "shape_at": list(SHAPES),
    "where": list(POSITIONS),
}  # "describe" has free-text answers


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
    questions = check_questions(questions, ("color", "position", "shape"))
    check_at_least("num_records", num_records, 1)
    check_at_least("image_size", image_size, 16)
    params = {"num_records": num_records, "seed": seed, "image_size": image_size, "questions": list(questions)}

    def record(rng: np.random.Generator, index: int) -> tuple[dict[str, Any], Image.Image]:
        color, position, shape = (str(rng.choice(v)) for v in (list(COLORS), POSITIONS, SHAPES))
        question = str(rng.choice(questions))
        answer = {"color": color, "position": position, "shape": shape}[question]
        background = tuple(int(c) for c in rng.integers(235, 256, size=3))
        image = Image.new("RGB", (image_size, image_size), background)
        draw_shape(ImageDraw.Draw(image), shape, box_in_quadrant(rng, image_size, position), COLORS[color])
        return llava_entry("shapes", index, "image", question, QUESTIONS[question], answer), image

    return build_dataset(out_dir, "shapes", params, questions, ANSWERS, record, save_png)


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
    questions = check_questions(questions, ("count", "exists", "color_at", "shape_at", "where", "describe"))
    check_at_least("num_records", num_records, 1)
    check_at_least("image_size", image_size, 32)
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
            draw_shape(draw, shape, box_in_quadrant(rng, image_size, position), COLORS[color])

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
        return llava_entry("scenes", index, "image", question_type, QUESTIONS[question_type].format(**fields), answer), image

    return build_dataset(out_dir, "scenes", params, questions, ANSWERS, record, save_png)


