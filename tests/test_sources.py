"""Data sources: LLaVA JSON/JSONL, Hugging Face datasets on disk, CSV/TSV/JSONL tables, and splits.

Expected messages follow the official LLaVA loader's placement (media at the start of the first human
turn, images before videos, `<image>` tags and their newline removed), written out by hand here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nvila_ft.data.hf_dataset import HFDataset
from nvila_ft.data.kit import DataError, describe, split_records
from nvila_ft.data.llava import LlavaJson
from nvila_ft.data.media import load_image, write_video
from nvila_ft.data.records import Record
from nvila_ft.data.tables import TableSource


def user(*parts):
    return {"role": "user", "content": list(parts)}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def text(t):
    return {"type": "text", "text": t}


def image(source):
    return {"type": "image", "image": source}


def video(source):
    return {"type": "video", "video": source}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) if not isinstance(r, str) else r for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "   ")
    path.write_text("\n".join(lines) + "\n")
    return path


LLAVA = [
    {"id": "one", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red"}]},
    {"id": 7, "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "Compare <image> and <image>."}, {"from": "gpt", "value": "Same."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
    {"images": ["b.png"], "video": "clip.mp4", "conversations": [
        {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A clip."}]},
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
]

LLAVA_MESSAGES = [
    [user(image("a.png"), text("What colour?")), assistant("Red")],
    [user(image("a.png"), image("b.png"), text("Compare  and .")), assistant("Same."), user(text("Sure?")), assistant("Yes.")],
    [user(image("b.png"), video("clip.mp4"), text("Describe.")), assistant("A clip.")],
    [{"role": "system", "content": [text("Be brief.")]}, user(text("Hi")), assistant("Hello")],
]


@pytest.fixture
def media_dir(tmp_path):
    Image.new("RGB", (16, 12), (200, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 12), (0, 200, 0)).save(tmp_path / "b.png")
    write_video([Image.new("RGB", (16, 16), (0, 0, 40 * i)) for i in range(4)], tmp_path / "clip.mp4")
    return tmp_path


# ----------------------------------------------------------------------------------------------- LLaVA JSON
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_json_and_jsonl(media_dir, suffix):
    path = media_dir / f"train{suffix}"
    write_json(path, LLAVA) if suffix == ".json" else write_jsonl(path, LLAVA, blank_after=2)
    records = LlavaJson(str(path)).records()
    assert [r.messages for r in records] == LLAVA_MESSAGES
    assert [r.id for r in records] == ["one", "7", None, None]
    assert [r.origin for r in records] == [f"{path}[{i}]" for i in range(4)]
    assert {r.media_root for r in records} == {str(media_dir.resolve())}
    assert records[1].meta == {"media_tags": {"image": 2, "video": 0}, "media_counts": {"image": 2, "video": 0}}
    assert records[2].meta == {"media_tags": {"image": 0, "video": 0}, "media_counts": {"image": 1, "video": 1}}
    assert records[0].answer == "Red"


def test_llava_media_root_and_limit(tmp_path):
    path = write_json(tmp_path / "d.json", LLAVA)
    records = LlavaJson(str(path), media_root=str(tmp_path / "media"), limit=2).records()
    assert len(records) == 2 and records[0].media_root == str((tmp_path / "media").resolve())
    # media paths are passed on as written, even unsafe ones: validation reports them with their record
    write_json(path, [{"image": "../x.png", "conversations": LLAVA[0]["conversations"]}])
    assert LlavaJson(str(path)).records()[0].messages[0]["content"][0] == image("../x.png")


def test_malformed_jsonl_line_names_line_number(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [LLAVA[0], "{not json", LLAVA[3]], blank_after=1)  # the bad line is line 3
    with pytest.raises(DataError, match=r"d\.jsonl\[1\]: line 3: not valid JSON"):
        LlavaJson(str(path)).records()
    source = LlavaJson(str(path), on_error="collect")
    records = source.records()
    assert [r.origin for r in records] == [f"{path}[0]", f"{path}[2]"]
    assert len(source.errors) == 1
    bad = source.errors[0]
    assert (bad.origin, bad.kind) == (f"{path}[1]", "structure") and "line 3" in bad.reason


def test_json_lines_named_json_is_said_so(tmp_path):
    path = write_jsonl(tmp_path / "train.json", LLAVA[:2])
    with pytest.raises(DataError) as error:
        LlavaJson(str(path)).records()
    assert str(error.value) == f"{path}: holds one JSON record per line (JSON Lines) but is named .json; rename it to train.jsonl"
    path.write_text('[{"a": 1}] trailing')  # plain broken JSON is still called that
    with pytest.raises(DataError, match="not valid JSON"):
        LlavaJson(str(path)).records()


def test_question_type_field_reaches_the_record(tmp_path):
    typed = [{**LLAVA[0], "question_type": "colour"}, LLAVA[3]]
    records = LlavaJson(str(write_json(tmp_path / "d.json", typed))).records()
    assert [r.question_type for r in records] == ["colour", None]
    assert [r.question for r in records] == ["What colour?", "Hi"]


def test_mixture_reads_its_sources_in_order(tmp_path):
    from nvila_ft.data.mixture import Mixture

    first = write_json(tmp_path / "a.json", LLAVA[:2])
    second = write_jsonl(tmp_path / "b.jsonl", [LLAVA[2], "{broken"])
    mixture = Mixture([LlavaJson(str(first)), LlavaJson(str(second), on_error="collect")])
    assert [r.origin for r in mixture.records()] == [f"{first}[0]", f"{first}[1]", f"{second}[0]"]
    assert [b.origin for b in mixture.errors] == [f"{second}[1]"]
    with pytest.raises(DataError, match="at least one source"):
        Mixture([])


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"image": "a.png"}, "'conversations'"),
        ({"conversations": [{"from": "human"}]}, r"conversations\[0\]"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, r"conversations\[0\]\.from"),
        ({"image": 3, "conversations": LLAVA[0]["conversations"]}, "field 'image'"),
        ({"video": ["a.mp4", None], "conversations": LLAVA[0]["conversations"]}, "field 'video'"),
        (["not", "a", "dict"], "expected a dict"),
    ],
)
def test_structural_errors_name_file_index_and_field(tmp_path, entry, field):
    path = write_json(tmp_path / "d.json", [LLAVA[0], entry])
    with pytest.raises(DataError, match=rf"d\.json\[1\]: .*{field}"):
        LlavaJson(str(path)).records()
    source = LlavaJson(str(path), on_error="collect")
    assert len(source.records()) == 1
    assert [(b.origin, b.kind) for b in source.errors] == [(f"{path}[1]", "structure")]


def test_unreadable_file_always_raises(tmp_path):
    broken = tmp_path / "d.json"
    broken.write_text('[{"conversations": ')
    for on_error in ("raise", "collect"):
        with pytest.raises(DataError, match=r"d\.json: not valid JSON"):
            LlavaJson(str(broken), on_error=on_error).records()
    with pytest.raises(DataError, match="expected a JSON list"):
        LlavaJson(str(write_json(tmp_path / "o.json", {"a": 1}))).records()
    with pytest.raises(DataError, match="cannot read"):
        LlavaJson(str(tmp_path / "missing.json"), on_error="collect").records()
    with pytest.raises(ValueError, match="on_error"):
        LlavaJson(str(broken), on_error="skip")


# ----------------------------------------------------------------------------------------------- HF datasets
@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Fail loudly on any connection attempt, and keep the datasets cache inside the test's folder."""
    import datasets.config

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"


def colours(n):
    return [Image.new("RGB", (8, 8), (60 * i, 0, 0)) for i in range(n)]


def test_hf_saved_dataset_with_image_feature_and_messages(tmp_path, no_network):
    from datasets import Dataset

    placeholder_messages = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{i}"}]},
         {"role": "assistant", "content": [{"type": "text", "text": f"a{i}"}]}]
        for i in range(3)
    ]
    ds = Dataset.from_dict({"image": colours(3), "messages": placeholder_messages, "id": ["x", "y", "z"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    records = HFDataset(str(tmp_path / "saved")).records()
    assert [r.origin for r in records] == [f"{tmp_path / 'saved'}[{i}]" for i in range(3)]
    assert [r.id for r in records] == ["x", "y", "z"]
    first = records[0].messages
    # left encoded by datasets.Image (a broken one is then one bad record), decoded when the record is processed
    assert isinstance(first[0]["content"][0]["image"], bytes)
    assert load_image(first[0]["content"][0]["image"]).getpixel((0, 0)) == (0, 0, 0)
    assert load_image(records[2].messages[0]["content"][0]["image"]).getpixel((0, 0)) == (120, 0, 0)
    assert first[0]["content"][1:] == [text("q0")] and first[1] == assistant("a0")
    assert records[0].media_root == str((tmp_path / "saved").resolve())

    # messages without image parts: the column's images go before the text of the first user turn
    plain = [[{"role": "user", "content": "what?"}, {"role": "assistant", "content": "red"}]]
    Dataset.from_dict({"image": colours(1), "messages": plain}).save_to_disk(str(tmp_path / "plain"))
    [record] = HFDataset(str(tmp_path / "plain"), system_prompt="Be brief.").records()
    assert record.messages[0] == {"role": "system", "content": "Be brief."}
    assert record.messages[1]["content"][1] == text("what?")
    assert isinstance(record.messages[1]["content"][0]["image"], bytes)


def test_hf_messages_keep_their_own_media_and_placeholders_must_match(tmp_path, no_network):
    rows = [
        {"messages": [user(image("in_message.png"), text("q")), assistant("a")], "image": "column.png"},
        {"messages": [user({"type": "image"}, {"type": "image"}, text("q")), assistant("a")], "image": "only_one.png"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    source = HFDataset(str(path), on_error="collect")
    [record] = source.records()
    assert record.messages[0]["content"] == [image("in_message.png"), text("q")]  # the column does not add a copy
    assert [(b.origin, b.kind) for b in source.errors] == [(f"{path}[1]", "structure")]
    assert "2 image placeholder(s) but 1 image(s) in column 'image'" in source.errors[0].reason


def test_hf_dataset_dict_picks_split(tmp_path, no_network):
    from datasets import Dataset, DatasetDict

    def split(n, prefix):
        return Dataset.from_dict({"question": [f"{prefix}{i}" for i in range(n)], "answer": ["ok"] * n})

    DatasetDict(train=split(3, "t"), validation=split(2, "v")).save_to_disk(str(tmp_path / "dd"))
    source = HFDataset(str(tmp_path / "dd"), split="validation", question_column="question", answer_column="answer")
    records = source.records()
    assert [r.messages[0]["content"] for r in records] == [[text("v0")], [text("v1")]]
    assert records[1].origin == f"{tmp_path / 'dd' / 'validation'}[1]"
    assert len(HFDataset(str(tmp_path / "dd"), question_column="question", answer_column="answer").records()) == 3
    with pytest.raises(DataError, match="no split 'test'"):
        HFDataset(str(tmp_path / "dd"), split="test", question_column="question", answer_column="answer").records()
    with pytest.raises(DataError, match="choose one with split="):
        HFDataset(str(tmp_path / "dd"), split=None, question_column="question", answer_column="answer").records()


def test_hf_data_files_parquet_json_and_columns(tmp_path, no_network):
    from datasets import Dataset

    rows = {
        "q": ["what?", "why?", "how?"],
        "a": ["x", "y", ""],
        "img": ["a.png", None, "c.png"],
        "vid": ["v.mp4", None, None],
    }
    ds = Dataset.from_dict(rows)
    (tmp_path / "files").mkdir()
    ds.to_parquet(str(tmp_path / "files" / "part-0.parquet"))
    ds.to_json(str(tmp_path / "t.jsonl"))
    expected_first = [user(image("a.png"), video("v.mp4"), text("what?")), {"role": "assistant", "content": "x"}]
    kwargs = dict(question_column="q", answer_column="a", image_column="img", video_column="vid", on_error="collect")
    files = tmp_path / "files"
    for path, root in ((files / "part-0.parquet", files), (tmp_path / "t.jsonl", tmp_path), (files, files),
                       (files / "*.parquet", files)):
        source = HFDataset(str(path), **kwargs)
        records = source.records()
        assert records[0].messages == expected_first, path
        assert records[1].messages[0]["content"] == [text("why?")]
        assert [(b.origin, b.kind) for b in source.errors] == [(f"{path}[2]", "no_answer")]
        assert records[0].media_root == str(root.resolve())
    with pytest.raises(DataError, match=r"\[2\]: column 'a': no answer"):
        HFDataset(str(tmp_path / "t.jsonl"), question_column="q", answer_column="a").records()
    # no applicable mapping
    with pytest.raises(DataError, match="found none of"):
        HFDataset(str(tmp_path / "t.jsonl")).records()
    with pytest.raises(DataError, match=r"no column\(s\) \['answer'\]"):
        HFDataset(str(tmp_path / "t.jsonl"), question_column="q", answer_column="answer").records()


def test_hf_conversations_column_in_llava_form(tmp_path, no_network):
    from datasets import Dataset

    ds = Dataset.from_dict({
        "conversations": [LLAVA[0]["conversations"], LLAVA[1]["conversations"]],
        "image": [["a.png"], ["a.png", "b.png"]],
    })
    ds.to_json(str(tmp_path / "c.json"))
    records = HFDataset(str(tmp_path / "c.json")).records()
    assert [r.messages for r in records] == LLAVA_MESSAGES[:2]
    assert records[1].meta == {"media_tags": {"image": 2, "video": 0}, "media_counts": {"image": 2, "video": 0}}


def test_hf_image_cells_of_every_kind(tmp_path, no_network):
    from datasets import Dataset, Features, Image as ImageFeature, Value

    png = tmp_path / "a.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(png)
    features = Features({"image": ImageFeature(decode=False), "question": Value("string"), "answer": Value("string")})
    Dataset.from_dict({"image": [str(png)], "question": ["q"], "answer": ["a"]}, features=features).save_to_disk(
        str(tmp_path / "undecoded"))
    [record] = HFDataset(str(tmp_path / "undecoded"), question_column="question", answer_column="answer").records()
    # an undecoded Image feature is a {"bytes", "path"} dict; the bytes (embedded by save_to_disk) win
    source = record.messages[0]["content"][0]["image"]
    assert isinstance(source, bytes) and source == png.read_bytes()


def test_hf_path_that_does_not_exist_is_not_a_hub_id(tmp_path, no_network):
    for path in ("someone/some-dataset", str(tmp_path / "nope"), str(tmp_path / "*.parquet")):
        with pytest.raises(DataError, match="no such file or folder|no file matches"):
            HFDataset(path).records()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a saved dataset nor data files"):
        HFDataset(str(tmp_path / "empty")).records()
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="cannot infer the data format"):
        HFDataset(str(tmp_path / "x.txt")).records()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="cannot load as parquet"):
        HFDataset(str(tmp_path / "bad.parquet"), on_error="collect").records()


# ----------------------------------------------------------------------------------------------- tables
TABLE_ROWS = [
    {"id": "r1", "question": "What organ?", "answer": "Liver", "image": "scan1.png", "modality": "CT"},
    {"id": "r2", "question": "Is it normal?", "answer": "", "image": "scan2.png", "modality": "MRI"},
    {"id": "r3", "question": "Which side?", "answer": "Left", "image": "", "modality": "X-ray"},
]


def write_table(path: Path, rows, delimiter=","):
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("name", ["t.csv", "t.tsv", "t.jsonl"])
def test_table_sources(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        write_jsonl(path, TABLE_ROWS)
    else:
        write_table(path, TABLE_ROWS, "\t" if name.endswith(".tsv") else ",")
    template = "Modality: {modality}. Answer with one word. {question}"
    source = TableSource(str(path), question_template=template, system_prompt="You are a radiologist.",
                         on_error="collect")
    records = source.records()
    assert records[0].messages == [
        {"role": "system", "content": "You are a radiologist."},
        user(image("scan1.png"), text("Modality: CT. Answer with one word. What organ?")),
        {"role": "assistant", "content": "Liver"},
    ]
    assert records[1].messages[1] == user(text("Modality: X-ray. Answer with one word. Which side?"))
    assert [r.id for r in records] == ["r1", "r3"]
    assert [r.origin for r in records] == [f"{path}[0]", f"{path}[2]"]
    assert records[0].media_root == str(tmp_path.resolve())
    assert [(b.origin, b.kind) for b in source.errors] == [(f"{path}[1]", "no_answer")]
    assert "no answer" in source.errors[0].reason
    with pytest.raises(DataError, match=r"t\.\w+\[1\]: column 'answer': no answer"):
        TableSource(str(path)).records()


def test_table_template_column_missing_and_delimiter(tmp_path):
    path = write_table(tmp_path / "t.txt", TABLE_ROWS, delimiter=";")
    source = TableSource(str(path), delimiter=";", question_template="{question} ({body_part})",
                         media_root=str(tmp_path / "imgs"), on_error="collect", limit=2)
    assert source.records() == []
    assert [b.kind for b in source.errors] == ["structure", "structure"]
    assert "['body_part']" in source.errors[0].reason
    [record] = TableSource(str(path), delimiter=";", limit=1).records()
    assert record.messages[0]["content"][-1] == text("What organ?")
    for template in ("{question!r}", "{question:>{width}}", "{}", "{row[0]}", "{question"):
        with pytest.raises(DataError, match="question_template"):
            TableSource(str(path), question_template=template)
    [record] = TableSource(str(path), delimiter=";", limit=1, question_template="{{{modality}}} {question}").records()
    assert record.messages[0]["content"][-1] == text("{CT} What organ?")


def test_table_video_column_and_lists(tmp_path):
    rows = [{"q": "What happens?", "a": "It rolls.", "frames": ["f1.png", "f2.png"], "clip": "v.mp4"}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    [record] = TableSource(str(path), question_column="q", answer_column="a", image_column="frames",
                           video_column="clip", id_column=None, question_template="{q}").records()
    assert record.messages[0] == user(image("f1.png"), image("f2.png"), video("v.mp4"), text("What happens?"))


# ----------------------------------------------------------------------------------------------- splits
def numbered(n):
    return [Record(messages=[], origin=f"f[{i}]") for i in range(n)]


def test_split_records_sizes_and_determinism():
    records = numbered(10)
    train, val = split_records(records, 0.2, seed=3)
    assert (len(train), len(val)) == (8, 2)
    assert sorted(r.origin for r in train + val) == sorted(r.origin for r in records)
    assert [r.origin for r in train] == [r.origin for r in records if r not in val]  # original order kept
    again_train, again_val = split_records(records, 0.2, seed=3)
    assert [r.origin for r in again_val] == [r.origin for r in val]
    assert any([r.origin for r in split_records(records, 0.2, seed=s)[1]] != [r.origin for r in val] for s in range(4, 10))
    assert split_records(records, 0.0, seed=0) == (records, [])
    assert [len(p) for p in split_records(numbered(3), 0.01, seed=0)] == [2, 1]  # at least one val record
    assert [len(p) for p in split_records(numbered(2), 0.9, seed=0)] == [1, 1]  # at least one train record
    assert [len(p) for p in split_records(numbered(1), 0.5, seed=0)] == [1, 0]
    with pytest.raises(ValueError):
        split_records(records, 1.0, seed=0)


def test_split_records_ignores_python_hash_seed():
    code = (
        "from nvila_ft.data.records import Record; from nvila_ft.data.kit import split_records;"
        "rs=[Record(messages=[], origin=f'f[{i}]') for i in range(50)];"
        "print([r.origin for r in split_records(rs, 0.1, seed=1)[1]])"
    )
    here = [r.origin for r in split_records([Record(messages=[], origin=f"f[{i}]") for i in range(50)], 0.1, seed=1)[1]]
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert other.strip() == str(here)


def test_describe(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [LLAVA[0], "{bad", LLAVA[3]])
    source = LlavaJson(str(path), on_error="collect")
    assert describe(source) == f"LlavaJson {path}: 2 records, 1 malformed"


# ----------------------------------------------------------------------------------------------- tasks
def test_task_validation_is_one_override_for_every_source_type(tmp_path, media_dir):
    from nvila_ft.domains.builtin import BuiltinData
    from nvila_ft.domains.task import Task

    write_json(media_dir / "train.json", LLAVA)
    (media_dir / "val").mkdir()
    val = write_json(media_dir / "val" / "val.json", LLAVA[:1])
    llava = LlavaJson(str(media_dir / "train.json"), limit=2, on_error="collect")
    # a path: read like train (same type), from its own folder, all of its records
    task = Task(name="t", train=llava, validation=str(val))
    assert isinstance(task.validation, LlavaJson) and task.validation.path == str(val)
    assert task.validation.media_root is None and task.validation.limit is None
    assert [r.media_root for r in task.load(0).validation] == [str((media_dir / "val").resolve())]
    # {path, media_root}: the mapping form of the same
    task = Task(name="t", train=llava, validation={"path": str(val), "media_root": str(media_dir)})
    assert [r.media_root for r in task.load(0).validation] == [str(media_dir.resolve())]
    # the null form in every task YAML: no validation file, hold out val_fraction
    assert Task(name="t", train=llava, validation={"path": None, "media_root": None}).validation is None
    # a table keeps its column mapping for the validation file
    table = tmp_path / "t.csv"
    table.write_text("img,q,a\na.png,What?,red\n")
    source = TableSource(str(table), image_column="img", question_column="q", answer_column="a")
    task = Task(name="t", train=source, validation=str(table))
    assert (task.validation.image_column, task.validation.question_column) == ("img", "q")
    # built-in training data has no path: a validation file is read as LLaVA JSON
    task = Task(name="t", train=BuiltinData(num_records=4, cache_dir=str(tmp_path)), validation=str(val))
    assert isinstance(task.validation, LlavaJson)
    with pytest.raises(ValueError, match=r"\['colums'\] are not settings of LlavaJson"):
        Task(name="t", train=llava, validation={"path": str(val), "colums": 3})
    with pytest.raises(ValueError, match="set task.validation.path"):
        Task(name="t", train=llava, validation={"path": None, "media_root": "/data"})


def test_split_records_holds_out_whole_groups():
    records = [Record([], f"f.json[{i}]", meta={"group": f"episode{i // 4}"}) for i in range(40)]  # 10 groups of 4
    train, val = split_records(records, 0.2, seed=1)
    held = {r.meta["group"] for r in val}
    assert len(held) == 2 and len(val) == 8 and not held & {r.meta["group"] for r in train}
    assert [r.origin for r in train + val] != [] and sorted(r.origin for r in train + val) == sorted(r.origin for r in records)
    single = [Record([], f"f.json[{i}]", meta={"group": "one"}) for i in range(5)]
    assert split_records(single, 0.5, seed=0) == (single, [])  # one group cannot be split
