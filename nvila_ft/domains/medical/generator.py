"""The built-in synthetic "scan" set: a greyscale body with or without a bright lesion (the medical demo)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nvila_ft.domains.synthetic import build_dataset, check_at_least, check_questions, llava_entry, save_png

SIDES = ("left", "right")
QUESTIONS: dict[str, str] = {"lesion": "Is there a lesion?", "side": "Which side is the lesion on?"}
ANSWERS: dict[str, list[str]] = {"lesion": ["yes", "no"], "side": list(SIDES)}


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
    questions = check_questions(questions, ("lesion", "side"))
    check_at_least("num_records", num_records, 1)
    check_at_least("image_size", image_size, 32)
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
        return llava_entry("scan", index, "image", question, QUESTIONS[question], answer), Image.fromarray(pixels, mode="L")

    return build_dataset(out_dir, "scan", params, questions, ANSWERS, record, save_png)


