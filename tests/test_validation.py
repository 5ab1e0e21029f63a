"""Dataset validation: every kind of broken record is found, named by file and index, and counted.

The broken inputs are real files (a truncated PNG, a path out of the media root, a video whose frame count
the temporal pooling cannot divide), run through the real processor, so a change in how media.py or
processor.py word their errors shows up here as a wrong kind.
"""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
from PIL import Image

from nvila_ft.data.conversation import ConversationError
from nvila_ft.data.hf_dataset import HFDataset
from nvila_ft.data.llava import LlavaJson
from nvila_ft.data.media import MediaError, load_image, load_video, write_video
from nvila_ft.data.processor import NVILAProcessor, SampleError
from nvila_ft.data.records import Record
from nvila_ft.data.validation import (
    KINDS,
    BadRecord,
    ValidationReport,
    check_task_data,
    classify,
    media_tag_mismatch,
    validate_records,
    validate_source,
)
from nvila_ft.model.presets import preset_config
from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
from nvila_ft.model.tokenizer import load_tokenizer

MAX_LENGTH = 200  # a tiny-preset image sample takes ~70 positions; the long record below ~600


def make_processor(preset: str = "nvila-8b-tiny", **kwargs) -> NVILAProcessor:
    """A preset's processor without building its weights (the processor needs only tokenizer + config)."""
    return NVILAProcessor(load_tokenizer(TINY_TOKENIZER_DIR), preset_config(preset), **kwargs)


@pytest.fixture(scope="module")
def processor():
    return make_processor(model_max_length=MAX_LENGTH)


def turns(question="<image>\nWhat colour?", answer="Red"):
    out = [{"from": "human", "value": question}]
    return out + [{"from": "gpt", "value": answer}] if answer is not None else out


def save_truncated_png(path):
    buffer = io.BytesIO()
    Image.effect_noise((48, 48), 64).convert("RGB").save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.fixture
def dataset(tmp_path):
    """A LLaVA JSON file with one record of every problem, and its media folder."""
    media = tmp_path / "media"
    media.mkdir()
    Image.new("RGB", (16, 12), (200, 0, 0)).save(media / "red.png")
    save_truncated_png(media / "broken.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")  # exists, but outside the media root
    write_video([Image.new("RGB", (16, 16), (0, 0, 60 * i)) for i in range(3)], media / "clip.mp4")
    records = [
        {"id": "good", "image": "red.png", "conversations": turns()},                          # 0
        {"image": "missing.png", "conversations": turns()},                                   # 1 missing_media
        {"image": "broken.png", "conversations": turns()},                                    # 2 corrupt_media
        {"image": "../outside.png", "conversations": turns()},                                # 3 unsafe_path
        {"image": "red.png", "conversations": turns(answer=None)},                            # 4 no_answer
        {"image": "red.png", "conversations": turns("<image>\n" + "word " * 300)},            # 5 too_long
        {"image": "red.png", "conversations": turns("<image> or <image>?")},                  # 6 media_tag_mismatch
        {"image": "red.png"},                                                                 # 7 structure
        {"video": "clip.mp4", "conversations": turns("<video>\nWhat happens?", "It fades")},  # 8 good (video)
        {"image": "red.png", "conversations": turns("What colour, no tag?")},                 # 9 good (no tags)
    ]
    path = media / "train.json"  # media paths are relative to the file's folder
    path.write_text(json.dumps(records))
    return path


EXPECTED_KINDS = {
    1: "missing_media", 2: "corrupt_media", 3: "unsafe_path", 4: "no_answer", 5: "too_long",
    6: "media_tag_mismatch", 7: "structure",
}


def test_every_problem_found_with_its_kind_and_origin(dataset, processor):
    source = LlavaJson(str(dataset))  # raise mode: validate_source collects anyway, and restores the mode
    report = validate_source(source, processor)
    assert source.on_error == "raise"
    assert {b.origin: b.kind for b in report.bad} == {f"{dataset}[{i}]": kind for i, kind in EXPECTED_KINDS.items()}
    assert [b.origin for b in report.bad] == [f"{dataset}[{i}]" for i in sorted(EXPECTED_KINDS)]  # file order
    assert [r.origin for r in report.good] == [f"{dataset}[{i}]" for i in (0, 8, 9)]
    assert report.total == 10 and len(report.lengths) == 3 and max(report.lengths) <= MAX_LENGTH
    reasons = {b.kind: b.reason for b in report.bad}
    assert "missing.png: not found" in reasons["missing_media"]
    assert "escapes the media root" in reasons["unsafe_path"]
    assert f"model_max_length is {MAX_LENGTH}" in reasons["too_long"]
    assert "2 <image> tag(s) for 1 image(s)" in reasons["media_tag_mismatch"]
    assert "'conversations'" in reasons["structure"]
    assert not reasons["missing_media"].startswith(str(dataset))  # the origin is not repeated in the reason
    assert report.summary() == (
        f"10 records: 3 ok, 7 bad (1 structure, 1 missing_media, 1 corrupt_media, 1 unsafe_path, 1 no_answer, "
        f"1 too_long, 1 media_tag_mismatch); longest {max(report.lengths)} positions (model_max_length {MAX_LENGTH})"
    )
    lines = report.lines()
    assert len(lines) == 7 and lines[0].startswith(f"{dataset}[1]: missing_media: message 0: missing.png: not found")
    assert not report.ok


def test_bad_records_are_listed_in_index_order_past_ten(tmp_path, processor):
    # the source's own structural errors (2, 10, 12) and the processor's (1, 9, 11) merged: [10] after [9], not
    # after [1] as the names sort
    structure = {"image": "red.png"}  # no conversations
    text = {"conversations": turns("Hello?", "Hi")}
    records = [text, {"image": "missing.png", "conversations": turns()}, structure] + [text] * 6
    records += [{"conversations": turns("Hello?", answer=None)}, structure, {"image": "gone.png", "conversations": turns()}]
    records += [structure, text]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    report = validate_source(LlavaJson(str(path)), processor)
    expected = [(1, "missing_media"), (2, "structure"), (9, "no_answer"), (10, "structure"), (11, "missing_media"),
                (12, "structure")]
    assert [(b.origin, b.kind) for b in report.bad] == [(f"{path}[{i}]", kind) for i, kind in expected]
    assert report.total == 14 and [r.origin for r in report.good] == [f"{path}[{i}]" for i in (0, 3, 4, 5, 6, 7, 8, 13)]


def test_an_over_long_answer_is_reported_not_cut(processor):
    # training cuts this sample to model_max_length and keeps it (the answer's first words survive the cut); the data
    # check runs without truncation and reports it, as validate-data does through check_task_data
    record = Record([{"role": "user", "content": "Describe it."}, {"role": "assistant", "content": "word " * 300}],
                    "long.json[3]")
    assert len(processor.process(record.messages).input_ids) == MAX_LENGTH
    for check_media in (True, False):
        report = validate_records([record], processor, check_media=check_media)
        assert [(b.origin, b.kind) for b in report.bad] == [("long.json[3]", "too_long")] and report.good == []
        assert f"model_max_length is {MAX_LENGTH}" in report.bad[0].reason
    check = check_task_data(SimpleNamespace(train=[record], validation=[], errors=[]), processor)
    assert [b.line().split(": ")[:2] for b in check.bad] == [["long.json[3]", "too_long"]]


def test_clean_dataset_reports_nothing(dataset, processor):
    records = [r for r in LlavaJson(str(dataset), on_error="collect").records() if r.origin.endswith(("[0]", "[8]", "[9]"))]
    report = validate_records(records, processor, progress=True)
    assert report.ok and report.bad == [] and report.lines() == []
    assert report.summary() == f"3 records: 3 ok, 0 bad; longest {max(report.lengths)} positions (model_max_length {MAX_LENGTH})"


def test_hf_dataset_with_decoded_images_validates_clean(tmp_path, processor, monkeypatch):
    import datasets.config
    from datasets import Dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    images = [Image.new("RGB", (20, 10), (0, 80 * i, 0)) for i in range(2)]
    Dataset.from_dict({"image": images, "question": ["a?", "b?"], "answer": ["x", "y"]}).save_to_disk(str(tmp_path / "d"))
    source = HFDataset(str(tmp_path / "d"), question_column="question", answer_column="answer")
    report = validate_source(source, processor)
    assert report.summary().startswith("2 records: 2 ok, 0 bad")


def test_video_frames_the_temporal_pooling_cannot_divide(tmp_path):
    write_video([Image.new("RGB", (16, 16), (0, 0, 60 * i)) for i in range(3)], tmp_path / "clip.mp4")
    record = Record(
        messages=[{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}, {"type": "text", "text": "?"}]},
                  {"role": "assistant", "content": "Fades."}],
        origin="videos.json[4]", media_root=str(tmp_path),
    )
    # nvila-video-tiny pools 8 frames at a time; a 3-frame video is sampled up to num_video_frames with repeats,
    # so 16 works and 12 cannot be pooled.
    assert validate_records([record], make_processor("nvila-video-tiny", num_video_frames=16)).ok
    report = validate_records([record], make_processor("nvila-video-tiny", num_video_frames=12))
    [bad] = report.bad
    assert (bad.origin, bad.kind) == ("videos.json[4]", "video_frames")
    assert "12 frames decoded" in bad.reason and "divisible by 8" in bad.reason


def test_check_media_false_skips_loading(dataset, processor):
    records = LlavaJson(str(dataset), on_error="collect").records()
    report = validate_records(records, processor, check_media=False)
    # media problems go unseen; conversation, answer, tag and (text) length problems are still found
    assert sorted(b.kind for b in report.bad) == ["media_tag_mismatch", "no_answer", "too_long"]
    assert report.summary().endswith("; media not checked")
    assert "without media" in report.summary()


# ----------------------------------------------------------------------------------------------- classify
def media_error(call):
    try:
        call()
    except MediaError as e:
        return e
    raise AssertionError("expected a MediaError")


def test_classify_real_media_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_video.mp4").write_bytes(b"definitely not a video")
    save_truncated_png(tmp_path / "cut.png")
    cases = {
        "missing_media": lambda: load_image("nope.png", tmp_path),
        "unsafe_path": lambda: load_image("../../etc/passwd", tmp_path),
        "corrupt_media": lambda: load_image("cut.png", tmp_path),
    }
    corrupt = [
        lambda: load_image(b"garbage"),
        lambda: load_video("empty", 4, tmp_path),
        lambda: load_video("not_video.mp4", 4, tmp_path),
        lambda: load_video([], 4),
    ]
    for kind, call in cases.items():
        error = media_error(call)
        wrapped = _wrap(error)
        assert classify(wrapped) == kind, (kind, str(error))
    for call in corrupt:
        error = media_error(call)
        assert classify(_wrap(error)) == "corrupt_media", str(error)


def _wrap(error: BaseException) -> SampleError:
    try:
        raise SampleError(f"x.json[0], message 0: {error}") from error
    except SampleError as wrapped:
        return wrapped


def test_classify_structure_kind_attribute_and_fallback():
    try:
        try:
            raise ConversationError("message 0: unknown role 'robot' (not found in the list)")
        except ConversationError as e:
            raise SampleError(f"s: {e}") from e
    except SampleError as wrapped:
        assert classify(wrapped) == "structure"  # a ConversationError wins over words in its message
    assert classify(RuntimeError("CUDA exploded")) == "other"
    tagged = MediaError("something new")
    tagged.kind = "missing_media"  # a structured kind, should media.py ever set one, beats message matching
    assert classify(_wrap(tagged)) == "missing_media"
    looping = ValueError("a")
    looping.__cause__ = looping
    assert classify(looping) == "other"


def test_media_tag_mismatch_rules():
    def record(tags, media):
        return Record(messages=[], origin="f[0]", meta={"media_tags": tags, "media_counts": media})

    assert media_tag_mismatch(record({"image": 0, "video": 0}, {"image": 2, "video": 1})) is None  # no tags: fine
    assert media_tag_mismatch(record({"image": 2, "video": 0}, {"image": 2, "video": 0})) is None
    assert media_tag_mismatch(record({"image": 1, "video": 0}, {"image": 1, "video": 1})) == "text has 0 <video> tag(s) for 1 video(s)"
    assert media_tag_mismatch(Record(messages=[], origin="f[0]")) is None  # not a LLaVA record


def test_report_summary_orders_kinds_and_handles_empty():
    bad = [BadRecord("f[3]", "r", "too_long"), BadRecord("f[1]", "r", "missing_media"), BadRecord("f[2]", "r", "missing_media")]
    report = ValidationReport(total=5, bad=bad, good=[], lengths=[])
    assert report.summary() == "5 records: 2 ok, 3 bad (2 missing_media, 1 too_long)"
    assert report.counts() == {"missing_media": 2, "too_long": 1}
    assert report.lines()[0] == "f[3]: too_long: r"
    assert set(KINDS) >= {"structure", "missing_media", "corrupt_media", "unsafe_path", "no_answer", "too_long",
                          "media_tag_mismatch", "other"}
    assert ValidationReport(total=0, bad=[], good=[], lengths=[]).summary() == "0 records: 0 ok, 0 bad"


def test_report_says_how_high_bit_depth_images_were_rescaled(tmp_path, processor):
    import numpy as np

    Image.fromarray(np.linspace(0, 4000, 40 * 40).reshape(40, 40).astype(np.uint16)).save(tmp_path / "ct.png")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    records = [
        Record([{"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": "Q"}]},
                {"role": "assistant", "content": "A"}], f"data.json[{i}]", media_root=str(tmp_path))
        for i, name in enumerate(["ct.png", "red.png", "ct.png"])
    ]
    report = validate_records(records, processor)
    assert report.ok and report.notes == {"high-bit-depth image rescaled to 8 bits by its own range": 2}
    assert "2 x high-bit-depth image rescaled to 8 bits by its own range" in report.summary()
    windowed = validate_records(records, make_processor(model_max_length=MAX_LENGTH, intensity_window=[0, 1000]))
    assert windowed.notes == {"high-bit-depth image rescaled to 8 bits by the window [0, 1000]": 2}


def test_a_media_tag_written_in_an_answer_is_text(tmp_path, processor):
    # "<image>" in an answer is neither a media tag (no mismatch with the one image) nor removed from the target
    Image.new("RGB", (40, 40), "red").save(tmp_path / "page.png")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"image": "page.png", "conversations": turns(
        "<image>\nWhich HTML tag shows this picture?", "The <image> tag; not <vila/video>.")}]))
    [record] = LlavaJson(str(data)).records()
    assert record.meta["media_tags"] == {"image": 1, "video": 0}
    assert validate_records([record], processor).ok
    sample = processor.process(record.messages, media_root=record.media_root)
    # placeholders only for the one image (a 3x3 Dynamic-S2 grid, 4 tokens a tile), none from the answer's text
    assert sample.input_ids.count(processor.token_ids.image) == 36 and processor.token_ids.video not in sample.input_ids
    target = [t for t, label in zip(sample.input_ids, sample.labels) if label != -100]
    assert processor.tokenizer.decode(target) == "The <image> tag; not <vila/video>.<|im_end|>"


def test_why_empty_names_the_kinds_and_the_first_bad_record(tmp_path, processor):
    data = tmp_path / "val.json"
    data.write_text(json.dumps([{"image": f"img/{i}.png", "conversations": turns()} for i in range(3)]))
    report = validate_source(LlavaJson(str(data)), processor)
    assert report.why_empty("validation").startswith(
        f"all 3 validation records are bad (3 missing_media); first: {data}[0]: missing_media: ")
    assert f"under the media root {tmp_path}" in report.why_empty("validation")
    assert validate_records([], processor).why_empty("validation") == "the validation data has no records"
