"""What users get wrong with the domain sources (medical VQA, robot episodes, grounding, preferences), DICOM media
and the prune / dpo settings: each mistake is ONE line naming the file, the record and the field, the good records
are kept (on_error=collect), and the CLI shows no traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from nvila_ft.data.kit import DataError
from nvila_ft.data.media import MediaError, VideoClip, image_size, load_image, load_video, volume_frames
from nvila_ft.domains.grounding.referring import GroundingData
from nvila_ft.domains.medical.sources import MedicalVQA
from nvila_ft.domains.preference.sources import PreferenceJson
from nvila_ft.domains.robotics.actions import ActionFormat
from nvila_ft.domains.robotics.episodes import RobotEpisodes
from nvila_ft.training.config import ConfigError

from .test_cli import run_cli

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

ACTIONS = {"x": {"low": -1, "high": 1, "bins": 3}, "grip": {"values": ["open", "close"]}}
VQA_RAD = {"qid": "q0", "image_name": "a.png", "question": "Is it normal?", "answer": "yes", "answer_type": "CLOSED"}


def write(path: Path, content) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def one_line(error: BaseException, *parts: str) -> str:
    text = str(error)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, (part, text)
    return text


def errors_by_index(source) -> dict[str, str]:
    """origin -> 'kind: reason' of a source's collected bad records (each a single line)."""
    lines = {}
    for bad in source.errors:
        assert "\n" not in bad.line(), bad.line()
        lines[bad.origin] = f"{bad.kind}: {bad.reason}"
    return lines


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (its pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ files
def file_sources(path: str):
    """Every new JSON-reading source over `path`."""
    return {
        "vqa_rad": MedicalVQA(path, "vqa_rad", on_error="collect"),
        "slake": MedicalVQA(path, "slake", on_error="collect"),
        "pathvqa": MedicalVQA(path, "pathvqa", on_error="collect"),
        "episodes": RobotEpisodes(path, action_fields=ACTIONS, on_error="collect"),
        "grounding": GroundingData(path),
        "preferences": PreferenceJson(path, on_error="collect"),
    }


@pytest.mark.parametrize("case, content, expected", [
    ("missing", None, ""),
    ("empty", "", "empty file"),
    ("blank", "  \n\n", "empty file"),
    ("invalid", '[{"qid": 1,', "not valid JSON"),
    ("lines_named_json", '{"qid": 1}\n{"qid": 2}\n', "JSON Lines"),
    ("object", '{"records": []}', "expected a JSON list of records, got a dict"),
])
def test_unreadable_files_are_one_line_naming_the_file(tmp_path, case, content, expected):
    path = tmp_path / f"{case}.json"
    if content is not None:
        path.write_text(content)
    for name, source in file_sources(str(path)).items():
        with pytest.raises(DataError) as caught:
            source.records()
        one_line(caught.value, str(path), expected)


def test_an_empty_json_lines_file_holds_no_record(tmp_path):
    """Unlike an empty .json (not even []): prune writes one for a mixture's file none of whose records is kept."""
    path = write(tmp_path / "empty.jsonl", "")
    for name, source in file_sources(path).items():
        assert source.records() == [] and source.errors == [], name


def test_a_directory_or_a_binary_file_is_one_line(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, source in file_sources(str(folder)).items():
        with pytest.raises(DataError) as caught:
            source.records()
        one_line(caught.value, str(folder))
    for pickle in (write(tmp_path / "data.pkl", b"(lp0\n."), write(tmp_path / "data.pickle", b"\x80\x04N.")):
        for name, source in file_sources(pickle).items():  # a protocol-0 pickle is ASCII: refused by its name
            with pytest.raises(DataError) as caught:
                source.records()
            one_line(caught.value, pickle, "a pickle")
    binary = write(tmp_path / "data.json", b"\xff\xfe\x00\x80garbage")
    for name, source in file_sources(binary).items():
        with pytest.raises(DataError) as caught:
            source.records()
        one_line(caught.value, binary)


def test_utf8_bom_is_read(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = write(tmp_path / "bom.json", "\ufeff" + json.dumps([VQA_RAD]))
    assert [r.answer for r in MedicalVQA(path, "vqa_rad").records()] == ["yes"]
    header = "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
    table = write(tmp_path / "bom.csv", "\ufeff" + header + "a.png,Which?,two,A:one,B:two,C:three,D:four,B\n")
    assert [r.answer for r in MedicalVQA(table, "pmc_vqa").records()] == ["B"]


def test_medical_file_mistakes(tmp_path):
    no_columns = write(tmp_path / "train.csv", "figure,question,answer\nx.png,q,a\n")
    with pytest.raises(DataError) as caught:
        MedicalVQA(no_columns, "pmc_vqa").records()
    one_line(caught.value, no_columns, "not a PMC-VQA table", "Answer_label", "Choice A")
    as_json = write(tmp_path / "train.json", "[]")
    with pytest.raises(DataError) as caught:  # was: "no column(s) ... (columns: ['[]'])"
        MedicalVQA(as_json, "pmc_vqa").records()
    one_line(caught.value, as_json, "pmc_vqa file is the release's CSV table, not .json")
    with pytest.raises(DataError) as caught:
        MedicalVQA(as_json, "VQA-RAD")
    one_line(caught.value, as_json, "unknown medical VQA layout 'VQA-RAD'", "vqa_rad")
    pickle = write(tmp_path / "train.pkl", b"\x80\x04N.")
    with pytest.raises(DataError) as caught:
        MedicalVQA(pickle, "pathvqa").records()
    one_line(caught.value, pickle, "pickle")
    with pytest.raises(DataError) as caught:
        MedicalVQA(write(tmp_path / "train.tsv", "a\tb\n"), "vqa_rad").records()
    one_line(caught.value, "train.tsv", "JSON or JSON Lines")
    folder = tmp_path / "vqa_rad"  # the release's folder, not its annotation file: was read without any image
    write(folder / "VQA_RAD Dataset Public.json", [VQA_RAD])
    with pytest.raises(DataError) as caught:
        MedicalVQA(str(folder), "vqa_rad").records()
    one_line(caught.value, str(folder), "no row has an image", "path=<folder>/VQA_RAD Dataset Public.json")


# ------------------------------------------------------------------------------------------------ records
def test_vqa_rad_field_types(tmp_path):
    """Numeric answers (VQA-RAD has "how many" questions answered 2) are text; what cannot be an answer is not."""
    (tmp_path / "a.png").write_bytes(b"")
    entries = [
        VQA_RAD,                                   # 0 kept
        {**VQA_RAD, "answer": 2},                  # 1 kept as "2"
        {**VQA_RAD, "answer": 0},                  # 2 kept as "0"
        {**VQA_RAD, "answer": True},               # 3
        {**VQA_RAD, "answer": None},               # 4
        {**VQA_RAD, "answer": "  "},               # 5
        {**VQA_RAD, "answer": ["yes"]},            # 6
        {**VQA_RAD, "answer": float("nan")},       # 7 (NaN: pandas' empty cell)
        {**VQA_RAD, "question": None},             # 8
        {**VQA_RAD, "question": {"en": "q"}},      # 9
        {**VQA_RAD, "answer_type": "YES/NO"},      # 10
        {**VQA_RAD, "answer_type": None},          # 11
        {**VQA_RAD, "answer_type": " closed "},    # 12 kept
        {**VQA_RAD, "image_name": 17},             # 13
        {**VQA_RAD, "image_name": None},           # 14
        {**VQA_RAD, "video": 5},                   # 15 (was taken as the path "5")
        "not a record",                            # 16
        None,                                      # 17
    ]
    path = write(tmp_path / "VQA_RAD Dataset Public.json", json.dumps(entries))
    source = MedicalVQA(path, "vqa_rad", on_error="collect")
    records = source.records()
    assert [r.answer for r in records] == ["yes", "2", "0", "yes"]
    assert [r.origin for r in records] == [f"{path}[{i}]" for i in (0, 1, 2, 12)]
    assert records[3].meta["question_type"] == "closed"
    bad = errors_by_index(source)
    expected = {3: "'answer': expected text, got bool True", 4: "no_answer: field 'answer': missing or empty",
                5: "'answer': missing or empty", 6: "'answer': expected text, got list", 7: "'answer': expected text, got nan",
                8: "'question': missing or empty", 9: "'question': expected text, got dict",
                10: "'answer_type': expected CLOSED or OPEN, got str 'YES/NO'", 11: "'answer_type': expected CLOSED or OPEN",
                13: "'image_name': expected a file path, got int 17", 14: "'image_name': missing or empty",
                15: "'video': expected a file path, got int 5", 16: "expected a dict (a vqa_rad record), got str",
                17: "expected a dict (a vqa_rad record), got NoneType"}
    assert set(bad) == {f"{path}[{i}]" for i in expected}
    for index, text in expected.items():
        assert text in bad[f"{path}[{index}]"], (index, bad[f"{path}[{index}]"])
    with pytest.raises(DataError) as caught:  # on_error=raise stops at the first, naming it
        MedicalVQA(path, "vqa_rad").records()
    one_line(caught.value, f"{path}[3]", "field 'answer'")


def test_medical_limit_and_language(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = write(tmp_path / "VQA_RAD Dataset Public.json", json.dumps([VQA_RAD, VQA_RAD, VQA_RAD]))
    assert len(MedicalVQA(path, "vqa_rad", limit=0).records()) == 0  # was 1
    assert len(MedicalVQA(path, "vqa_rad", limit=2).records()) == 2
    slake = {"qid": 1, "img_name": "a.png", "question": "q", "answer": "yes", "answer_type": "CLOSED", "q_lang": "en"}
    path = write(tmp_path / "train.json", json.dumps([slake, {**slake, "q_lang": "zh"}]))
    with pytest.raises(DataError) as caught:  # was: 0 records and no word why
        MedicalVQA(path, "slake", language="english").records()
    one_line(caught.value, path, "no record has q_lang 'english'", "en, zh")
    assert len(MedicalVQA(path, "slake", language="zh").records()) == 1
    no_split = write(tmp_path / "hf.json", json.dumps([VQA_RAD]))  # a copy without phrase_type: all train
    with pytest.raises(DataError) as caught:
        MedicalVQA(no_split, "vqa_rad", split="test").records()
    one_line(caught.value, no_split, "no record is in VQA-RAD's test split", "split to null")


def test_pmc_vqa_rows(tmp_path):
    header = "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
    rows = ["a.png,Which?,two,A:one,B:two,C:three,D:four,B",   # 0 kept
            "a.png,Which?,two,A:one,B:two,C:three,D:four,E",   # 1 label not an option
            "a.png,Which?,two,A:one,B:two,,,C",                # 2 label names an empty choice
            "a.png,Which?,two,A:one,B:two,C:three,D:four,",    # 3 no label
            "a.png,Which?,two,,,,,A",                          # 4 no choices at all
            "a.png,Which?,two,A:one,B:two,C:three,D:four, b ",  # 5 kept (label case and spaces)
            ",Which?,two,A:one,B:two,C:three,D:four,A",        # 6 no figure
            "a.png,Which?"]                                    # 7 a short row
    path = write(tmp_path / "train_2.csv", header + "\n".join(rows) + "\n")
    source = MedicalVQA(path, "pmc_vqa", on_error="collect")
    assert [(r.origin, r.answer) for r in source.records()] == [(f"{path}[0]", "B"), (f"{path}[5]", "B")]
    bad = errors_by_index(source)
    assert "'Answer_label': 'E' is not one of the options ['A', 'B', 'C', 'D']" in bad[f"{path}[1]"]
    assert "'Answer_label': 'C' is not one of the options ['A', 'B']" in bad[f"{path}[2]"]
    assert bad[f"{path}[3]"] == "no_answer: field 'Answer_label': missing or empty"
    assert "is not one of the options []" in bad[f"{path}[4]"]
    assert "field 'Figure_path': missing or empty" in bad[f"{path}[6]"]
    assert "field 'Answer_label'" in bad[f"{path}[7]"]


def test_robot_steps(tmp_path):
    frames = tmp_path / "ep0"
    frames.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(frames / f"{i}.png")
    act = {"x": 0.5, "grip": "open"}
    steps = [{"frame": 0, "action": act},                          # 0 kept
             {"frame": -1, "action": act},                         # 1
             {"frame": 1.5, "action": act},                        # 2
             {"frame": "2", "action": act},                        # 3
             {"frame": None, "action": act},                       # 4
             {"action": act},                                      # 5 no frame
             {"frame": 1, "action": {"x": 7.0, "grip": "open"}},   # 6 kept: clipped to the top bin
             {"frame": 1, "action": {"x": 0.5}},                   # 7 missing field
             {"frame": 1, "action": {"x": "0.5", "grip": "open"}},  # 8
             {"frame": 1, "action": {"x": float("nan"), "grip": "open"}},  # 9
             {"frame": 1, "action": {"x": 0.5, "grip": "half"}},   # 10
             {"frame": 1},                                         # 11 no action
             7,                                                    # 12
             {"frame": 9, "action": act}]                          # 13 kept here; the media check refuses it
    episodes = [{"episode_id": "pick-1", "video": "ep0", "instruction": "pick it", "steps": steps},
                {"episode_id": "pick-2", "video": 5, "instruction": "pick it", "steps": steps[:1]},
                {"episode_id": "pick-3", "video": "ep0", "instruction": " ", "steps": steps[:1]},
                {"episode_id": "pick-4", "video": "ep0", "instruction": "pick it", "steps": []}]
    path = write(tmp_path / "episodes.json", json.dumps(episodes))
    source = RobotEpisodes(path, action_fields=ACTIONS, context_frames=2, on_error="collect")
    records = source.records()
    assert [(r.id, r.answer) for r in records] == [("pick-1#0", "x=+1 grip=open"), ("pick-1#6", "x=+1 grip=open"),
                                                   ("pick-1#13", "x=+1 grip=open")]
    bad = errors_by_index(source)
    where = f"{path}[0].steps"
    for index, text in {1: "'frame': expected a frame index (a whole number >= 0), got int -1", 2: "got float 1.5",
                        3: "got str '2'", 4: "'frame'", 5: "'frame'", 7: "'action': missing field(s) ['grip']",
                        8: "'action': x: expected a finite number, got '0.5'", 9: "x: expected a finite number, got nan",
                        10: "grip: 'half' is not one of ['open', 'close']", 11: "'action'",
                        12: "expected a dict (a step)"}.items():
        assert text in bad[f"{where}[{index}]"], (index, bad[f"{where}[{index}]"])
    assert "field 'video'" in bad[f"{path}[1]"] and "field 'instruction'" in bad[f"{path}[2]"]
    assert "field 'steps'" in bad[f"{path}[3]"]
    assert len(bad) == 14
    clip = records[2].messages[0]["content"][0]["video"]
    with pytest.raises(MediaError) as caught:  # frame 9 of a 3-frame folder: named when its media are loaded
        load_video(clip, 2, records[2].media_root)
    assert caught.value.kind == "video_frames"
    one_line(caught.value, "frame 9 asked for, the folder has 3 frames")


def test_action_field_settings():
    with pytest.raises(ValueError, match=r"action_fields.grip.values: a list of distinct"):
        ActionFormat({"grip": {"values": "open"}})  # was read letter by letter: o, p, e, n
    with pytest.raises(ValueError, match=r"action_fields.x: needs low < high"):
        ActionFormat({"x": {"low": 1, "high": -1, "bins": 3}})
    with pytest.raises(ValueError, match=r"action_fields.x: a numeric field needs low, high and bins"):
        ActionFormat({"x": {"low": -1, "high": 1, "bins": "three"}})


def test_refcoco_boxes(tmp_path):
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    (tmp_path / "huge.png").write_bytes(png_header(100_000, 100_000))
    good = {"image": "a.png", "expression": "the dot", "bbox": [1, 1, 5, 5]}
    entries = [good,
               {**good, "bbox": [1, 1, float("nan"), 5]}, {**good, "bbox": [1, 1, float("inf"), 5]},
               {**good, "bbox": ["1", "1", "5", "5"]}, {**good, "bbox": [1, 1, -5, 5]}, {**good, "bbox": [1, 1, 50, 5]},
               {**good, "bbox": "1,1,5,5"}, {**good, "bbox": None}, {**good, "bbox": [True, 1, 5, 5]},
               {**good, "bbox": [1, 1, 5]}, {**good, "expression": 5}, {**good, "image": "huge.png"},
               {**good, "image": "../a.png"}]
    path = write(tmp_path / "refs.json", json.dumps(entries))
    source = GroundingData(path, on_error="collect")
    assert [r.answer for r in source.records()] == ["[0.05, 0.10, 0.30, 0.60]"]
    bad = errors_by_index(source)
    assert len(bad) == len(entries) - 1
    for index in range(1, 10):
        assert "field 'bbox'" in bad[f"{path}[{index}]"], bad[f"{path}[{index}]"]
    assert "expected numbers, got [1, 1, nan, 5]" in bad[f"{path}[1]"]
    assert "zero or negative area" in bad[f"{path}[4]"] and "outside the 20x10 image" in bad[f"{path}[5]"]
    assert "field 'expression'" in bad[f"{path}[10]"]
    # was an uncaught DecompressionBombError out of image_size
    assert bad[f"{path}[11]"].startswith("corrupt_media: field 'image'") and "decompression bomb" in bad[f"{path}[11]"]
    assert bad[f"{path}[12]"].startswith("unsafe_path: field 'image'")


def test_preference_replies(tmp_path):
    good = {"image": "a.png", "prompt": "<image>\nIs there a lesion?", "chosen": "yes", "rejected": "no"}
    entries = [good, {**good, "rejected": "yes"}, {**good, "rejected": "  yes \n"}, {**good, "chosen": "   "},
               {**good, "chosen": 1}, {**good, "rejected": None}, {**good, "prompt": " "},
               {k: v for k, v in good.items() if k != "rejected"}, {**good, "image": 3}]
    path = write(tmp_path / "prefs.json", json.dumps(entries))
    source = PreferenceJson(path, on_error="collect")
    assert [r.origin for r in source.records()] == [f"{path}[0]"]
    bad = errors_by_index(source)
    assert "field 'rejected': the same reply as 'chosen'" in bad[f"{path}[1]"]
    assert "field 'rejected': the same reply as 'chosen'" in bad[f"{path}[2]"]
    assert bad[f"{path}[3]"] == "no_answer: field 'chosen': empty reply"
    assert "field 'chosen': expected a string" in bad[f"{path}[4]"]
    assert "field 'rejected': expected a string" in bad[f"{path}[5]"]
    assert "field 'prompt': empty" in bad[f"{path}[6]"] and "field 'rejected': missing" in bad[f"{path}[7]"]
    assert "field 'image'" in bad[f"{path}[8]"]


# ------------------------------------------------------------------------------------------------ safety
@pytest.fixture
def media(tmp_path):
    """A media root with good media, and symlinks from inside it to files outside it."""
    outside, root = tmp_path / "outside", tmp_path / "root"
    outside.mkdir()
    root.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    shutil.copy(get_testdata_file("CT_small.dcm"), outside / "secret.dcm")
    series = root / "series"
    series.mkdir()
    slice_ = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(3):
        slice_.InstanceNumber = i + 1
        slice_.save_as(series / f"{i}.dcm")
    os.symlink(outside / "secret.dcm", series / "3.dcm")
    frames = root / "frames"
    frames.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(frames / f"{i}.png")
    os.symlink(outside / "secret.png", frames / "3.png")
    os.symlink(outside / "secret.png", root / "link.png")
    return root, outside


def test_media_paths_cannot_leave_the_media_root(media):
    root, outside = media
    for path in ("../outside/secret.png", str(outside / "secret.png"), "link.png"):
        for load in (load_image, image_size):
            with pytest.raises(MediaError) as caught:
                load(path, root)
            assert caught.value.kind == "unsafe_path"
            one_line(caught.value, path, "escapes the media root")
    # a series folder or a frame folder holding one symlink out is refused before that file is opened
    for call in (lambda: load_video("series", 4, root), lambda: volume_frames("series", root),
                 lambda: load_video(VideoClip("series", (0, 3)), 2, root),
                 lambda: load_video("frames", 4, root), lambda: load_video(VideoClip("frames", (2, 3)), 2, root)):
        with pytest.raises(MediaError) as caught:
            call()
        assert caught.value.kind == "unsafe_path", str(caught.value)
        one_line(caught.value, "escapes the media root")


def test_broken_media_are_corrupt_media_not_crashes(tmp_path):
    (tmp_path / "fake.png").write_text("not an image")
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "truncated.dcm")
    no_pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "no_pixels.dcm")
    huge = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    huge.Rows = huge.Columns = 60_000
    huge.save_as(tmp_path / "huge.dcm")
    (tmp_path / "huge.png").write_bytes(png_header(100_000, 100_000))
    for name, reason in (("fake.png", "cannot decode image"), ("truncated.dcm", "cannot decode its Explicit VR Little Endian"),
                         ("no_pixels.dcm", "holds no pixel data although it is a CT Image Storage file"),
                         ("huge.dcm", "decompression bomb"),
                         ("huge.png", "decompression bomb")):
        with pytest.raises(MediaError) as caught:
            load_image(name, tmp_path)
        assert caught.value.kind == "corrupt_media"
        one_line(caught.value, name, reason)
    with pytest.raises(MediaError) as caught:
        image_size("huge.png", tmp_path)
    one_line(caught.value, "huge.png", "decompression bomb")
    with pytest.raises(MediaError) as caught:
        load_video("truncated.dcm", 2, tmp_path)
    one_line(caught.value, "truncated.dcm", "cannot decode its Explicit VR Little Endian")


# ------------------------------------------------------------------------------------------------ config
def built(where: str, **node):
    from omegaconf import OmegaConf

    from nvila_ft.commands.common import build

    targets = {"data": "nvila_ft.training.config.DataOptions", "prune": "nvila_ft.commands.prune.PruneOptions",
               "dpo": "nvila_ft.commands.dpo.DPOOptions"}
    return build(OmegaConf.create({where: {"_target_": targets[where], **node}}), where)


@pytest.mark.parametrize("where, node, message", [
    ("data", {"dicom_window": "lungs"}, "data.dicom_window: unknown DICOM window 'lungs'"),
    ("data", {"dicom_window": [40]}, "data.dicom_window: DICOM window [40]: give [centre, width]"),
    ("data", {"dicom_window": [40, 80, 1]}, "give [centre, width]"),
    ("data", {"dicom_window": ["a", "b"]}, "give [centre, width]"),
    ("data", {"dicom_window": [40, 0]}, "the width must be >= 1"),
    ("data", {"dicom_window": [40, -80]}, "the width must be >= 1"),
    ("prune", {"keep_fraction": 0}, "prune.keep_fraction = 0: the share of each source kept, in (0, 1]"),
    ("prune", {"keep_fraction": 1.5}, "prune.keep_fraction = 1.5"),
    ("prune", {"keep_fraction": "half"}, "prune.keep_fraction = 'half': expected a number"),
    ("prune", {"strong": None}, "prune.strong is not set"),
    ("dpo", {"beta": 0}, "dpo.beta = 0: must be a finite number > 0"),
    ("dpo", {"beta": -0.5}, "dpo.beta = -0.5"),
    ("dpo", {"beta": float("nan")}, "dpo.beta = nan"),
    ("dpo", {"beta": float("inf")}, "dpo.beta = inf"),
    ("dpo", {"loss_type": "dpo"}, "dpo.loss_type = 'dpo': use one (or a list) of sigmoid"),
    ("dpo", {"extra": {"beta": -1}}, "dpo.extra sets ['beta']"),
])
def test_bad_settings_are_config_errors(where, node, message):
    if where == "prune":
        node = {"strong": "base", "weak": "base", **node}
    with pytest.raises(ConfigError) as caught:
        built(where, **node)
    one_line(caught.value, message)


def test_prune_model_that_does_not_exist(tmp_path):
    from nvila_ft.commands.prune import choose_model

    with pytest.raises(ConfigError) as caught:
        choose_model("strong", str(tmp_path / "no-such-run"), None, tmp_path)
    one_line(caught.value, "prune.strong", "no-such-run", "does not exist")
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ConfigError) as caught:
        choose_model("strong", str(tmp_path / "empty-run"), None, tmp_path)
    one_line(caught.value, "prune.strong", "neither a run directory")


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_reports_user_errors_in_one_line(tmp_path):
    """Bad records are listed by validate-data (file, index, field) and the good ones kept; a bad file or a bad
    dpo policy is one line. No traceback in any."""
    cache = tmp_path / "cache"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "a.png")
    entries = [VQA_RAD, {**VQA_RAD, "qid": "q1", "answer": 3, "answer_type": "OPEN"},
               {**VQA_RAD, "qid": "q2", "answer_type": "MAYBE"}, {**VQA_RAD, "qid": "q3", "image_name": "../x.png"}]
    data = write(tmp_path / "vqa_rad.json", json.dumps(entries))
    result = run_cli(["validate-data", "task=vqa_rad", f"task.train.path={data}", "task.train.split=null",
                      "task.val_fraction=0", f"hydra.run.dir={tmp_path / 'v'}"], tmp_path, cache, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert f"{data}[2]: structure: field 'answer_type': expected CLOSED or OPEN, got str 'MAYBE'" in output
    assert f"{data}[3]: unsafe_path" in output and "escapes the media root" in output
    assert f"{data}[0]" not in output and f"{data}[1]" not in output  # the good records, "3" among them

    table = write(tmp_path / "pmc.csv", "figure,question\nx.png,q\n")
    result = run_cli(["validate-data", "task=pmc_vqa", f"task.train.path={table}", f"hydra.run.dir={tmp_path / 'p'}"],
                     tmp_path, cache, check=False)
    lines = [line for line in result.stderr.splitlines() if table in line]
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and "not a PMC-VQA table" in lines[0]

    prefs = write(tmp_path / "prefs.json", json.dumps([{"image": "a.png", "prompt": "<image>\nq", "chosen": "a",
                                                        "rejected": "b"}]))
    result = run_cli(["dpo", "task=preference", f"task.train.path={prefs}", "adapters=ft_vit_ft_llm",
                      f"hydra.run.dir={tmp_path / 'd'}"], tmp_path, cache, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert "adapters.vision_tower.method = full would keep a second copy" in result.stderr


def test_prune_writes_medical_and_grounding_subsets_and_refuses_episodes_up_front(tmp_path):
    """`nvila-ft prune` on a medical or grounding task wrote nothing after scoring both models (no subset writer):
    the pruned data is now the kept entries of the original file, and a source it cannot write is refused before."""
    from nvila_ft.data.subset import check_subset_source, write_subset

    images = tmp_path / "VQA_RAD Image Folder"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    path = write(tmp_path / "VQA_RAD Dataset Public.json",
                 json.dumps([{**VQA_RAD, "qid": f"q{i}", "answer": str(i)} for i in range(4)]))
    source = MedicalVQA(path, "vqa_rad")
    records = source.records()
    [written] = write_subset(source, [records[1].origin, records[3].origin], tmp_path / "out")
    assert written.media_root == str(images.resolve()) and written.records == 2
    again = MedicalVQA(str(written.path), "vqa_rad", media_root=written.media_root).records()
    assert [(r.id, r.answer) for r in again] == [("q1", "1"), ("q3", "3")]

    header = "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
    table = write(tmp_path / "pmc" / "train_2.csv", header + "".join(
        f"a.png,Q{i}?,x,A:one,B:two,C:three,D:four,{'ABCD'[i]}\n" for i in range(4)))
    source = MedicalVQA(table, "pmc_vqa")
    records = source.records()
    [written] = write_subset(source, [records[2].origin], tmp_path / "out-pmc")
    assert [r.answer for r in MedicalVQA(str(written.path), "pmc_vqa").records()] == ["C"]

    import datasets

    datasets.Dataset.from_dict({"image": ["a.png"] * 3, "question": ["q0", "q1", "q2"], "answer": ["yes", "no", "liver"]}
                               ).to_parquet(str(tmp_path / "pathvqa.parquet"))
    source = MedicalVQA(str(tmp_path / "pathvqa.parquet"), "pathvqa")
    [written] = write_subset(source, [source.records()[1].origin], tmp_path / "out-pathvqa")
    assert [r.answer for r in MedicalVQA(str(written.path), "pathvqa").records()] == ["no"]

    Image.new("RGB", (20, 10)).save(tmp_path / "b.png")
    refs = write(tmp_path / "refs.json", json.dumps([{"image": "b.png", "expression": f"e{i}", "bbox": [1, 1, 5, 5]}
                                                     for i in range(3)]))
    source = GroundingData(refs)
    [written] = write_subset(source, [source.records()[2].origin], tmp_path / "out-refs")
    assert json.loads(written.path.read_text()) == [{"image": "b.png", "expression": "e2", "bbox": [1, 1, 5, 5]}]

    episodes = RobotEpisodes(write(tmp_path / "episodes.json", "[]"), action_fields=ACTIONS)
    with pytest.raises(DataError) as caught:
        check_subset_source(episodes)
    one_line(caught.value, "episodes.json", "cannot write a subset of a RobotEpisodes source")


def test_validation_names_unsafe_and_broken_media_of_domain_records(media, tmp_path):
    """Through the processor, as `validate-data` and training run them: a robot episode whose video leaves the media
    root or whose window takes a symlinked frame, a VQA-RAD series folder holding a symlink out, a truncated DICOM."""
    from nvila_ft.data.validation import validate_records

    from .test_validation import make_processor

    root, _ = media
    shutil.copy(get_testdata_file("MR_truncated.dcm"), root / "truncated.dcm")
    step = {"frame": 1, "action": {"x": 0.0, "grip": "open"}}
    episodes = [{"episode_id": "ok", "video": "frames", "instruction": "pick", "steps": [step]},
                {"episode_id": "out", "video": "../outside", "instruction": "pick", "steps": [step]},
                {"episode_id": "link", "video": "frames", "instruction": "pick", "steps": [{**step, "frame": 3}]}]
    path = write(root / "episodes.json", json.dumps(episodes))
    records = RobotEpisodes(path, action_fields=ACTIONS).records()
    scans = [{**VQA_RAD, "qid": "series", "image_name": "series/"}, {**VQA_RAD, "qid": "cut", "image_name": "truncated.dcm"}]
    records += MedicalVQA(write(root / "vqa_rad.json", json.dumps(scans)), "vqa_rad", media_root=str(root)).records()
    report = validate_records(records, make_processor("nvila-video-tiny"))
    kinds = {bad.origin: bad.kind for bad in report.bad}
    assert kinds == {f"{path}[1].steps[0]": "unsafe_path", f"{path}[2].steps[0]": "unsafe_path",
                     records[3].origin: "unsafe_path", records[4].origin: "corrupt_media"}, report.lines()
    assert all("\n" not in line for line in report.lines())
