"""The built-in grounding set: shapes in a grid, a referring expression, the box of the shape it names."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nvila_ft.domains.grounding.boxes import GROUNDING_PROMPT, box_from_pixels, format_box
from nvila_ft.domains.synthetic import COLORS, SHAPES, build_dataset, check_at_least, check_questions, draw_shape, llava_entry, save_png


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
    sentence describes: the red circle." -> "[0.05, 0.36, 0.30, 0.61]" (`nvila_ft.domains.grounding.boxes`' format).

    Each shape fills 70-90% of its cell's side, placed with jitter, so a model that finds the right cell and
    answers that cell's typical box already reaches IoU >= 0.5, and exact edges earn more. The answer is the
    shape's tight pixel box (circles, squares and triangles all touch the four sides of the square they are
    drawn in). Returns the path of data.json.
    """
    questions = check_questions(questions, ("ground",))
    check_at_least("num_records", num_records, 1)
    check_at_least("grid", grid, 1)
    check_at_least("image_size", image_size, 8 * grid)
    check_at_least("max_objects", max_objects, 1)
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
            draw_shape(draw, shape, box, COLORS[str(color)])
            objects.append((str(color), shape, box))
        color, shape, (left, top, right, bottom) = objects[int(rng.integers(count))]
        answer = format_box(box_from_pixels([left, top, right + 1, bottom + 1], image_size, image_size, "xyxy"))
        return llava_entry("grounding", index, "image", "ground", GROUNDING_PROMPT.format(expression=f"the {color} {shape}"), answer), image

    return build_dataset(out_dir, "grounding", params, questions, {}, record, save_png)  # box answers: no closed set




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


