"""What the built-in synthetic datasets share: drawn from a seed, written in the official LLaVA JSON layout, cached.

They are the demo's default tasks: a tiny randomly initialised NVILA (32 px tiles, 8 px patches) must learn
them on a CPU in minutes. So each answer depends on the image through a feature a tiny model picks up
quickly (a saturated colour, a quadrant, a bright blob, a direction of motion), every question has a small
closed answer set (so `accuracy` is meaningful and chance level is known), and the picture's attributes are
drawn independently of the question asked, so the model has to read the question too. Each domain pack holds its
own generators; `GENERATORS` in `nvila_ft.domains.registry` names them all.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nvila_ft.atomic import atomic_write_json
from nvila_ft.data.llava import LlavaJson

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

DATA_FILE, ANSWERS_FILE, MANIFEST_FILE = "data.json", "answers.json", "manifest.json"


@dataclass(frozen=True)
class Generator:
    """A built-in dataset: the function that writes it (out_dir, num_records, seed=..., **options) -> its data file,
    and the source that reads that file back."""

    make: Callable[..., Path]
    reader: Callable[[str], Any] = LlavaJson


def check_questions(questions: Sequence[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """`questions` as a tuple; ValueError when empty or naming a type outside `allowed`."""
    questions = (questions,) if isinstance(questions, str) else tuple(questions)
    if not questions:
        raise ValueError(f"questions must name at least one of {list(allowed)}")
    unknown = [q for q in questions if q not in allowed]
    if unknown:
        raise ValueError(f"unknown question type(s) {unknown}; choose from {list(allowed)}")
    return questions


def check_at_least(name: str, value: int, minimum: int) -> None:
    """ValueError unless `value` is an integer >= `minimum`."""
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def llava_entry(prefix: str, index: int, kind: str, question_type: str, question: str, answer: str) -> dict[str, Any]:
    """Record `index` of a generated set: its media path (images/ or videos/), question and answer, as LLaVA JSON."""
    folder, suffix = ("images", "png") if kind == "image" else ("videos", "mp4")
    return {
        "id": f"{prefix}-{index:06d}",
        kind: f"{folder}/{prefix}_{index:06d}.{suffix}",
        "conversations": [
            {"from": "human", "value": f"<{kind}>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "question_type": question_type,
    }


def box_in_quadrant(rng: np.random.Generator, image_size: int, position: str) -> tuple[int, int, int, int]:
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


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    """A filled circle, square or (upward) triangle inside `box`, without anti-aliasing."""
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)


def save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG")


def build_dataset(
    out_dir: str | os.PathLike,
    generator: str,
    params: dict[str, Any],
    question_types: Sequence[str],
    answers: Mapping[str, list[str]],
    make_record: Callable[[np.random.Generator, int], tuple[dict[str, Any], Any]],
    save_media: Callable[[Any, Path], None],
) -> Path:
    """Write (or reuse) a dataset: media first, then data.json and answers.json (the answer set, from `answers`, of
    each of `question_types` that has one), then the manifest."""
    out_dir = Path(out_dir)
    data_path = out_dir / DATA_FILE
    manifest = {"generator": generator, "version": GENERATOR_VERSION, "params": params, "count": params["num_records"]}
    if is_complete(out_dir, manifest):
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
    atomic_write_json(out_dir / ANSWERS_FILE, {q: answers[q] for q in question_types if q in answers})
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return data_path


def is_complete(out_dir: Path, manifest: dict[str, Any], data_file: str = DATA_FILE, with_answers: bool = True) -> bool:
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


def options_name(options: Mapping[str, Any]) -> str:
    """A generator's options as part of a folder name ("grid=4-seed=1"), "" when there are none."""
    return re.sub(r"[^A-Za-z0-9=.,-]+", "_", "-".join(f"{k}={v}" for k, v in sorted(options.items())))


def cache_folder(name: str, cache_dir: str | None) -> Path:
    """The folder a generated set named `name` is cached in: under `cache_dir`, or `default_cache_dir()`."""
    return (Path(cache_dir) if cache_dir else default_cache_dir()) / name


def builtin_folder(dataset: str, num_records: int, seed: int, options: Mapping[str, Any], cache_dir: str | None) -> Path:
    """The cache folder of built-in dataset `dataset` drawn with these settings ("shapes-n1000-seed0[-<options>]")."""
    named = options_name(options)
    return cache_folder(f"{dataset}-n{num_records}-seed{seed}" + (f"-{named}" if named else ""), cache_dir)
