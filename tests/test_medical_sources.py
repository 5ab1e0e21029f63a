"""Medical VQA datasets in their own layouts -> records (field mapping, answer types, errors, validation files)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from nvila_ft.data.kit import DataError
from nvila_ft.domains.medical.sources import MedicalVQA
from nvila_ft.domains.task import Task


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "gray").save(path)


def _texts(record):
    user = record.messages[0]["content"]
    return [p for p in user if p["type"] != "text"], user[-1]["text"], record.answer


VQA_RAD = [
    {"qid": 7, "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": "Yes", "answer_type": "CLOSED",
     "question_type": "PRES", "question": "Is there a mass?", "phrase_type": "freeform"},
    {"qid": "8", "image_name": "synpic1.jpg", "image_organ": "HEAD", "answer": 2, "answer_type": "OPEN ",
     "question_type": "COUNT", "question": "How many lesions?", "phrase_type": "test_freeform"},
    {"qid": 9, "image_name": "synpic2.jpg", "answer": "left", "answer_type": "maybe", "question": "Which side?"},
    {"qid": 10, "image_name": "synpic2.jpg", "answer": "", "answer_type": "OPEN", "question": "What?"},
]


def test_vqa_rad_official_layout(tmp_path):
    folder = tmp_path / "VQA_RAD Image Folder"
    _image(folder / "synpic1.jpg")
    path = tmp_path / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(VQA_RAD))
    source = MedicalVQA(str(path), "vqa_rad", on_error="collect")
    records = source.records()
    assert [r.id for r in records] == ["7", "8"]
    assert records[0].media_root == str(folder.resolve())
    media, question, answer = _texts(records[0])
    assert media == [{"type": "image", "image": "synpic1.jpg"}] and question == "Is there a mass?" and answer == "Yes"
    assert records[0].meta["question_type"] == "closed" and records[0].meta["dataset"] == "vqa_rad"
    assert records[0].meta["organ"] == "HEAD" and records[0].meta["category"] == "PRES"
    assert records[1].answer == "2" and records[1].question_type == "open"
    assert [(e.origin, e.kind) for e in source.errors] == [(f"{path}[2]", "structure"), (f"{path}[3]", "no_answer")]
    assert "field 'answer_type'" in source.errors[0].reason and "field 'answer'" in source.errors[1].reason
    assert [r.id for r in MedicalVQA(str(path), "vqa_rad", split="test", on_error="collect").records()] == ["8"]
    with pytest.raises(DataError, match=r"Public.json\[2\]: field 'answer_type'"):
        MedicalVQA(str(path), "vqa_rad").records()


SLAKE = [
    {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "Which organ is abnormal?", "answer": "Lung",
     "q_lang": "en", "location": "Lung", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
     "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": 11934},
    {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": "哪个器官异常？", "answer": "肺",
     "q_lang": "zh", "location": "Lung", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
     "content_type": "Organ", "qid": 11935},
    {"img_id": 103, "img_name": "xmlab103/source.jpg", "question": "Is the lung healthy?", "answer": "No",
     "q_lang": "en", "location": "Lung", "modality": "X-Ray", "answer_type": "CLOSED", "base_type": "vqa",
     "content_type": "Abnormality", "qid": 11936},
    {"img_id": 104, "img_name": 104, "question": "Is it a CT?", "answer": "Yes", "q_lang": "en",
     "answer_type": "CLOSED", "qid": 11937},
]


def test_slake_layout_language_and_validation_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "train.json").write_text(json.dumps(SLAKE))
    (tmp_path / "validate.json").write_text(json.dumps(SLAKE[:3]))
    source = MedicalVQA(str(tmp_path / "train.json"), "slake", on_error="collect")
    records = source.records()
    assert [r.id for r in records] == ["11934", "11936"]
    assert records[0].media_root == str((tmp_path / "imgs").resolve())
    assert records[0].meta == {"question_type": "open", "dataset": "slake", "language": "en", "modality": "CT",
                               "location": "Lung", "content_type": "Organ", "base_type": "vqa", "image_id": "102"}
    assert records[1].question_type == "closed"
    assert len(source.errors) == 1 and "[3]" in source.errors[0].origin and "field 'img_name'" in source.errors[0].reason
    assert len(MedicalVQA(str(tmp_path / "train.json"), "slake", language=None, on_error="collect").records()) == 3
    assert [r.answer for r in MedicalVQA(str(tmp_path / "train.json"), "slake", language="zh").records()] == ["肺"]
    # task.validation=<path>: read like train (same layout and language), the other file
    task = Task(name="slake", train=source, validation=str(tmp_path / "validate.json"))
    assert isinstance(task.validation, MedicalVQA) and task.validation.layout == "slake"
    data = task.load(seed=0)
    assert [r.id for r in data.validation] == ["11934", "11936"] and len(data.errors) == 1


def test_pmc_vqa_prompt_answer_and_choices(tmp_path):
    (tmp_path / "figures").mkdir()
    path = tmp_path / "train.csv"
    path.write_text(
        "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
        "PMC1_F1.jpg,What is the uptake pattern?,Focal uptake,A:Diffuse uptake ,B:Focal uptake ,C:No uptake ,"
        "D:Cannot determine ,B\n"
        "PMC2_F2.jpg,Which modality?,MRI,CT,MRI,X-ray,PET,E\n"
        "PMC3_F3.jpg,,CT,CT,MRI,X-ray,PET,A\n"
    )
    source = MedicalVQA(str(path), "pmc_vqa", on_error="collect")
    (record,) = source.records()
    media, prompt, answer = _texts(record)
    assert media == [{"type": "image", "image": "PMC1_F1.jpg"}]
    assert prompt == ("What is the uptake pattern?\nA. Diffuse uptake\nB. Focal uptake\nC. No uptake\n"
                      "D. Cannot determine")
    assert answer == "B" and record.question_type == "choice"
    assert record.meta["choices"]["B"] == "Focal uptake" and record.meta["answer_text"] == "Focal uptake"
    assert [e.origin for e in source.errors] == [f"{path}[1]", f"{path}[2]"]
    assert "field 'Answer_label'" in source.errors[0].reason and "field 'Question'" in source.errors[1].reason
    (tmp_path / "bad.csv").write_text("image,question,answer\na.jpg,q,a\n")
    with pytest.raises(DataError, match="not a PMC-VQA table"):
        MedicalVQA(str(tmp_path / "bad.csv"), "pmc_vqa").records()


def test_pathvqa_json_lines_parquet_and_pickle(tmp_path):
    lines = [{"image": "train/img1.jpg", "question": "Is this necrosis?", "answer": "yes"},
             {"image": {"path": "train/img2.jpg", "bytes": None}, "question": "What is present?", "answer": "fibrin"},
             {"image": 3, "question": "What?", "answer": "x"},
             {"image": "train/img3.jpg", "question": "What is the stain result?", "answer": "positive"}]
    path = tmp_path / "pathvqa.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = MedicalVQA(str(path), "pathvqa", on_error="collect")
    records = source.records()
    # PathVQA's rule (NVlabs/VILA llava/eval/pathvqa.py): closed iff the answer is exactly yes or no
    assert [r.question_type for r in records] == ["closed", "open", "open"]
    assert _texts(records[1])[0] == [{"type": "image", "image": "train/img2.jpg"}]
    assert source.errors[0].origin == f"{path}[2]" and "field 'image'" in source.errors[0].reason

    import datasets

    png = tmp_path / "x.png"
    _image(png)
    table = datasets.Dataset.from_dict({"image": [{"bytes": png.read_bytes(), "path": None}] * 2,
                                        "question": ["Is it benign?", "What organ?"], "answer": ["no", "liver"]})
    table.to_parquet(str(tmp_path / "test.parquet"))
    records = MedicalVQA(str(tmp_path / "test.parquet"), "pathvqa").records()
    assert [(r.answer, r.question_type) for r in records] == [("no", "closed"), ("liver", "open")]
    assert isinstance(records[0].messages[0]["content"][0]["image"], bytes)

    pickle_file = tmp_path / "train_vqa.pkl"
    pickle_file.write_bytes(b"\x80\x04N.")
    with pytest.raises(DataError, match=r"train_vqa.pkl: a pickle.*convert it to parquet or JSON Lines") as error:
        MedicalVQA(str(pickle_file), "pathvqa").records()
    assert "\n" not in str(error.value)


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="unknown medical VQA layout 'slak'"):
        MedicalVQA("x.json", "slak")
    with pytest.raises(DataError, match="split= is VQA-RAD's official split"):
        MedicalVQA("x.json", "slake", split="test")
    with pytest.raises(DataError, match="no such file"):
        MedicalVQA(str(tmp_path / "none.json"), "slake").records()


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from nvila_ft.cli import config_dir, register_config_groups
    from nvila_ft.commands.common import build

    register_config_groups()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return build(compose("config", overrides=[*overrides, "run_dir=unused"]), "task")


def test_task_configs_read_the_native_layouts(tmp_path):
    path = tmp_path / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(VQA_RAD[:2]))
    task = _compose(["task=vqa_rad", f"task.train.path='{path}'", f"task.validation.path='{path}'"])
    data = task.load(seed=0)
    assert [r.id for r in data.train] == ["7"] and [r.id for r in data.validation] == ["8"]
    assert task.objective_metric == "overall" and "closed_accuracy" in task.metrics and "open_recall" in task.metrics
    assert data.train[0].messages[0]["content"][-1]["text"].endswith("Answer the question using a single word or phrase.")
    (tmp_path / "t.csv").write_text("Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
                                    "f.jpg,Which?,CT,A:CT,B:MRI,C:PET,D:US,A\n")
    task = _compose(["task=pmc_vqa", f"task.train.path={tmp_path / 't.csv'}", "task.val_fraction=0"])
    (record,) = task.load(seed=0).train
    prompt = "".join(p["text"] for p in record.messages[0]["content"] if p["type"] == "text")
    assert prompt == "Which?\nA. CT\nB. MRI\nC. PET\nD. US\nAnswer with the option's letter from the given choices directly."
    assert task.metrics == ["choice_accuracy"]
    for name, layout in (("slake", "slake"), ("pathvqa", "pathvqa")):
        task = _compose([f"task={name}", "task.train.path=x.json"])
        assert task.train.layout == layout and task.objective_metric == "overall"


def test_video_field_is_a_video_and_a_series_folder_as_image_stays_an_image(tmp_path):
    """One rule in every source: a multi-frame source where an image is expected gives one frame (data.image_frame);
    the `video` field makes a video."""
    (tmp_path / "imgs" / "study1").mkdir(parents=True)
    entries = [dict(SLAKE[0], img_name="study1/"), dict(SLAKE[2], img_name=None, video="xmlab103/cine.dcm")]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    folder, cine = MedicalVQA(str(tmp_path / "train.json"), "slake").records()
    assert _texts(folder)[0] == [{"type": "image", "image": "study1"}] and folder.modality == "image"
    assert _texts(cine)[0] == [{"type": "video", "video": "xmlab103/cine.dcm"}]
