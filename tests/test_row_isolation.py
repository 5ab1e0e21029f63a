"""Rows broken the way real downloads break, in the released layouts of SLAKE, VQA-RAD (JSON and its Hugging Face
copy), PathVQA (parquet) and PMC-VQA, and in a generic Hugging Face dataset: each broken row is one bad record naming
its file, row and field, the good rows are kept, and nothing ends in a traceback.

Broken the way downloads break: an image cut short (an interrupted transfer), an HTML error page saved under the
image's name, an empty file, a missing file, and in parquet a null image and bytes that are not an image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from nvila_ft.data.hf_dataset import HFDataset
from nvila_ft.data.validation import validate_source
from nvila_ft.domains.medical.sources import MedicalVQA

pytest.importorskip("datasets")


def png(colour: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (colour, 20, 20)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


BROKEN_FILES = {  # name -> (bytes or None for missing, the kind validate-data reports, words of its reason)
    "good.jpg": (jpeg(), None, ""),
    "cut.jpg": (jpeg()[:300], "corrupt_media", "cannot decode image"),
    "error_page.jpg": (b"<html><body>503 Service Unavailable</body></html>", "corrupt_media", "cannot decode image"),
    "empty.jpg": (b"", "corrupt_media", "cannot decode image"),
    "missing.jpg": (None, "missing_media", "not found"),
}


def image_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (content, _, _) in BROKEN_FILES.items():
        if content is not None:
            (folder / name).write_bytes(content)


def check(report, origins: list[str], expected: list[tuple[str | None, str]]) -> None:
    """Each origin's outcome: kept (None) or one bad record of the kind, one line naming the row and the file."""
    bad = {b.origin: b for b in report.bad}
    for origin, (kind, words) in zip(origins, expected):
        if kind is None:
            assert origin not in bad, bad.get(origin)
            continue
        line = bad[origin].line()
        assert bad[origin].kind == kind and words in line and "\n" not in line, line
    assert len(report.good) == sum(kind is None for kind, _ in expected)


@pytest.mark.parametrize("layout", ["slake", "vqa_rad", "pmc_vqa"])
def test_released_annotation_layouts_with_broken_images(layout, tmp_path, tiny_processor):
    folder = {"slake": "imgs", "vqa_rad": "VQA_RAD Image Folder", "pmc_vqa": "figures"}[layout]
    image_folder(tmp_path / folder)
    names = list(BROKEN_FILES)
    if layout == "pmc_vqa":
        header = "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
        rows = "".join(f"{name},What modality?,CT,A:CT,B:MR,C:US,D:XR,A\n" for name in names)
        path = tmp_path / "train_2.csv"
        path.write_text(header + rows)
    else:
        field = "img_name" if layout == "slake" else "image_name"
        entries = [{"qid": i, field: name, "question": "Is it normal?", "answer": "Yes", "answer_type": "CLOSED",
                    "q_lang": "en"} for i, name in enumerate(names)]
        path = tmp_path / ("train.json" if layout == "slake" else "VQA_RAD Dataset Public.json")
        path.write_text(json.dumps(entries))
    report = validate_source(MedicalVQA(str(path), layout, split=None), tiny_processor)
    expected = [(kind, f"{name}: {words}" if kind else "") for name, (_, kind, words) in BROKEN_FILES.items()]
    check(report, [f"{path}[{i}]" for i in range(len(names))], expected)


def parquet(path: Path, images: list) -> None:
    """PathVQA's / VQA-RAD's Hugging Face layout: image as a {bytes, path} struct, question, answer."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    features = Features({"image": ImageFeature(), "question": Value("string"), "answer": Value("string")})
    rows = {"image": images, "question": [f"q{i}" for i in range(len(images))], "answer": ["yes"] * len(images)}
    Dataset.from_dict(rows, features=features).to_parquet(str(path))


HF_ROWS = [  # (image cell, the kind of its bad record or None, words of the reason)
    ({"bytes": png(), "path": "a.png"}, None, ""),
    ({"bytes": png()[:40], "path": "cut.png"}, "corrupt_media", "column 'image': cannot decode image"),
    ({"bytes": b"not an image at all", "path": "x.jpg"}, "corrupt_media", "column 'image': cannot decode image"),
    (None, "missing_media", "column 'image': no image (empty or null)"),
    ({"bytes": png(200), "path": "b.png"}, None, ""),
]


@pytest.mark.parametrize("layout", ["pathvqa", "vqa_rad"])
def test_hugging_face_copies_with_a_truncated_a_foreign_and_a_null_image(layout, tmp_path, tiny_processor):
    """Was: `OSError: Truncated File Read` from datasets' row decoding ended validate-data and finetune, and the
    null image became a text-only sample without a word."""
    path = tmp_path / "train-00000-of-00001.parquet"
    parquet(path, [cell for cell, _, _ in HF_ROWS])
    report = validate_source(MedicalVQA(str(path), layout, split=None), tiny_processor)
    check(report, [f"{path}[{i}]" for i in range(len(HF_ROWS))], [(kind, words) for _, kind, words in HF_ROWS])


def test_generic_hugging_face_dataset(tmp_path, tiny_processor):
    path = tmp_path / "data.parquet"
    parquet(path, [cell for cell, _, _ in HF_ROWS])
    source = HFDataset(str(path), question_column="question", answer_column="answer", image_required=True)
    report = validate_source(source, tiny_processor)
    check(report, [f"{path}[{i}]" for i in range(len(HF_ROWS))], [(kind, words) for _, kind, words in HF_ROWS])
    # image_required=false keeps the null-image row as a text-only sample, as mixtures of text and image data need
    lenient = validate_source(HFDataset(str(path), question_column="question", answer_column="answer"), tiny_processor)
    assert len(lenient.good) == 3 and [r.modality for r in lenient.good].count("text") == 1


def test_validate_data_on_a_broken_parquet_ends_in_its_report_not_a_traceback(tmp_path):
    from tests.test_cli import run_cli

    path = tmp_path / "train.parquet"
    parquet(path, [cell for cell, _, _ in HF_ROWS])
    result = run_cli(["validate-data", "task=pathvqa", f"task.train.path={path}", "task.val_fraction=0",
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tmp_path / "cache", check=False)
    assert result.returncode == 1, result.stderr[-3000:]  # bad records found: exit 1, not a crash
    assert "Traceback" not in result.stderr + result.stdout
    report = (tmp_path / "run" / "data_report.txt").read_text()
    assert f"{path}[1]: corrupt_media" in report and f"{path}[3]: missing_media" in report
    assert "train: 4 records: 2 ok, 2 bad" in report  # the null image is the source's own (structural) finding


def test_a_table_row_without_its_image_is_a_bad_record_when_images_are_required(tmp_path, tiny_processor):
    from nvila_ft.data.tables import TableSource

    image_folder(tmp_path)
    (tmp_path / "table.csv").write_text("image,question,answer\ngood.jpg,What?,x\n,What?,y\nerror_page.jpg,What?,z\n")
    report = validate_source(TableSource(str(tmp_path / "table.csv"), image_required=True), tiny_processor)
    origins = [f"{tmp_path / 'table.csv'}[{i}]" for i in range(3)]
    check(report, origins, [(None, ""), ("missing_media", "column 'image': no image (empty)"),
                            ("corrupt_media", "error_page.jpg: cannot decode image (not in a format Pillow reads)")])
    lenient = validate_source(TableSource(str(tmp_path / "table.csv")), tiny_processor)
    assert [r.modality for r in lenient.good] == ["image", "text"]
