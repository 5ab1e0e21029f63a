"""Write a small dataset in SLAKE's own layout, for examples/medical_slake.sh and its test.

    python examples/make_slake_sample.py OUT_DIR [--images 48] [--validation-images 16] [--seed 0]

OUT_DIR gets what the SLAKE release ships: `imgs/xmlab<id>/source.jpg` images and `train.json` /
`validate.json`, lists of {qid, img_id, img_name, question, answer, answer_type (OPEN/CLOSED), q_lang, location,
modality, base_type, content_type}. The images are synthetic greyscale "scans" (a noisy body, with or without
one bright lesion on the left or right), so the answers depend on the image:
- CLOSED "Is there a lesion in this image?" -> "yes"/"no", also asked in Chinese (q_lang zh, left out by
  task=slake's default language: en);
- OPEN "Where is the lesion?" -> "left"/"right" (only when there is one).
Two DICOM studies from pydicom's test files (CT_small.dcm, MR_small.dcm) are added as
`imgs/xmlab9<n>/source.dcm` with OPEN "Which modality is used?" -> "ct"/"mri" and CLOSED "Is this a CT scan?".
Answers are lower case (SLAKE's own are capitalised; scoring ignores case): words the tiny pretrained NVILA's
small vocabulary spells in few tokens, so that a CPU run of a few hundred steps learns them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64


def scan(rng: np.random.Generator, side: str | None) -> Image.Image:
    """A 64 x 64 grey scan: an elliptical body (about 110) and, when `side` is given, a bright disc (235) in
    that half of the image (viewer's left/right)."""
    image = Image.new("L", (SIZE, SIZE), 25)
    draw = ImageDraw.Draw(image)
    draw.ellipse((3, 10, SIZE - 4, SIZE - 11), fill=int(rng.integers(100, 121)), outline=150, width=2)
    if side is not None:
        radius = int(rng.integers(4, 8))
        low, high = (8 + radius, SIZE // 2 - radius - 2) if side == "left" else (SIZE // 2 + radius + 1, SIZE - 9 - radius)
        cx, cy = int(rng.integers(low, high + 1)), int(rng.integers(SIZE // 2 - 8, SIZE // 2 + 9))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=235)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-15, 16, size=(SIZE, SIZE), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "L")


def _entry(qid: int, img_id: int, img_name: str, question: str, answer: str, answer_type: str, lang: str,
           location: str, modality: str, content_type: str) -> dict:
    return {"img_id": img_id, "img_name": img_name, "question": question, "answer": answer, "q_lang": lang,
            "location": location, "modality": modality, "answer_type": answer_type, "base_type": "vqa",
            "content_type": content_type, "triple": ["vhead", "_", "_"], "qid": qid}


def make_slake_sample(out_dir: str | Path, images: int = 48, validation_images: int = 16, seed: int = 0) -> Path:
    """Write the dataset (see the module docstring) under `out_dir`; returns `out_dir`."""
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "validate": []}
    qid = 0
    for img_id in range(images + validation_images):
        split = "train" if img_id < images else "validate"
        side = [None, "left", "right"][int(rng.integers(3))]
        name = f"xmlab{img_id}/source.jpg"
        (out / "imgs" / f"xmlab{img_id}").mkdir(parents=True, exist_ok=True)
        scan(rng, side).save(out / "imgs" / name, quality=95)
        present = "yes" if side else "no"
        rows = [("Is there a lesion in this image?", present, "CLOSED", "en", "Abnormality"),
                ("这张图片里有病灶吗？", "是" if side else "否", "CLOSED", "zh", "Abnormality")]
        if side:
            rows.append(("Where is the lesion?", side, "OPEN", "en", "Position"))
        for question, answer, answer_type, lang, content in rows:
            qid += 1
            splits[split].append(_entry(qid, img_id, name, question, answer, answer_type, lang, "Lung", "CT", content))

    import pydicom.data

    for number, (file, modality) in enumerate((("CT_small.dcm", "ct"), ("MR_small.dcm", "mri"))):
        img_id = 900 + number
        name = f"xmlab{img_id}/source.dcm"
        (out / "imgs" / f"xmlab{img_id}").mkdir(parents=True, exist_ok=True)
        shutil.copy(pydicom.data.get_testdata_file(file), out / "imgs" / name)
        for split in splits:
            for question, answer, answer_type in (("Which modality is used?", modality, "OPEN"),
                                                  ("Is this a CT scan?", "yes" if modality == "ct" else "no", "CLOSED")):
                qid += 1
                splits[split].append(_entry(qid, img_id, name, question, answer, answer_type, "en", "Brain",
                                            modality, "Modality"))
    for split, entries in splits.items():
        (out / f"{split}.json").write_text(json.dumps(entries, ensure_ascii=False, indent=1), encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--validation-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_slake_sample(args.out_dir, args.images, args.validation_images, args.seed)
    counts = {split: len(json.loads((out / f"{split}.json").read_text(encoding="utf-8"))) for split in ("train", "validate")}
    print(f"SLAKE-layout sample in {out}: {counts['train']} train and {counts['validate']} validation questions")


if __name__ == "__main__":
    main()
