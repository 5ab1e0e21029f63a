"""The built-in preference set: pairs of a right and a wrong answer over a built-in question-answer set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from nvila_ft.atomic import atomic_write_json
from nvila_ft.domains.general.generators import make_shapes_dataset
from nvila_ft.domains.medical.generator import make_scan_dataset
from nvila_ft.domains.synthetic import (
    ANSWERS_FILE,
    DATA_FILE,
    GENERATOR_VERSION,
    MANIFEST_FILE,
    check_at_least,
    is_complete,
)

# The question-answer sets preferences are drawn over (closed answer sets, so every question has wrong answers).
SOURCES = {"scan": make_scan_dataset, "shapes": make_shapes_dataset}


def make_preference_dataset(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int = 0,
    source: str = "scan",
    image_size: int = 64,
) -> Path:
    """Preference pairs over a built-in question-answer dataset (`source`: scan or shapes): each record keeps the
    question and its media, with the right answer as `chosen` and one of the question type's wrong answers (drawn
    uniformly) as `rejected`, in the LLaVA preference layout of `nvila_ft.domains.preference.sources`:
    {"id", "image", "conversations": [human "<image>\\n<question>"], "chosen", "rejected", "question_type"}.

    The source dataset is written into `out_dir/source` by its own generator; data.json refers to its images.
    Returns the path of data.json.
    """
    if source not in ("scan", "shapes"):
        raise ValueError(f"source must be 'scan' or 'shapes' (closed answer sets), got {source!r}")
    check_at_least("num_records", num_records, 1)
    out_dir = Path(out_dir)
    data_path = out_dir / DATA_FILE
    params = {"num_records": num_records, "seed": seed, "source": source, "image_size": image_size}
    manifest = {"generator": "preference", "version": GENERATOR_VERSION, "params": params, "count": num_records}
    if is_complete(out_dir, manifest):
        return data_path
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    base = SOURCES[source](out_dir / "source", num_records, seed=seed, image_size=image_size)
    answers = json.loads((base.parent / ANSWERS_FILE).read_text())
    records = []
    for index, record in enumerate(json.loads(base.read_text())):
        question, answer = record["conversations"]
        wrong = [a for a in answers[record["question_type"]] if a != answer["value"]]
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
    atomic_write_json(out_dir / ANSWERS_FILE, answers)
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return data_path


