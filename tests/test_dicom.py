"""DICOM images (medical users' usual format) through load_image, against pydicom's own pipeline (its decoders,
modality and VOI LUTs, palette tables), and every way a file can fail ending in one line that names it."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from nvila_ft.data.dicom import is_dicom
from nvila_ft.data.media import MediaError, load_image, load_video, volume_frames
from nvila_ft.data.media_base import MediaOptions

pydicom = pytest.importorskip("pydicom")
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def bundled(name: str) -> Path:
    path = TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


def one_line(error: BaseException, *parts: str) -> str:
    message = str(error)
    assert "\n" not in message and all(part in message for part in parts), message
    return message


def test_ct_is_windowed_to_8_bit_grey(tmp_path):
    source = bundled("CT_small.dcm")
    image = load_image(source)
    dataset = pydicom.dcmread(str(source))
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset).astype(float)
    expected = np.round((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)
    array = np.asarray(image)
    assert image.mode == "RGB" and image.size == (dataset.Columns, dataset.Rows)
    assert np.array_equal(array[..., 0], expected) and np.array_equal(array[..., 0], array[..., 2])
    assert array.min() == 0 and array.max() == 255


def test_dicom_is_recognised_without_extension(tmp_path):
    copy = tmp_path / "scan_without_suffix"
    shutil.copy(bundled("MR_small.dcm"), copy)
    assert is_dicom(copy)
    assert np.array_equal(np.asarray(load_image(copy)), np.asarray(load_image(bundled("MR_small.dcm"))))


def test_broken_dicom_names_the_file(tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(bundled("CT_small.dcm").read_bytes()[:600])  # the header, cut before the pixels
    with pytest.raises(MediaError) as caught:
        load_image(broken)
    one_line(caught.value, "broken.dcm: holds no pixel data although it is a CT Image Storage file")
    assert caught.value.kind == "corrupt_media"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(bundled("CT_small.dcm").read_bytes()[:-3000])  # pixel data shorter than its header says
    with pytest.raises(MediaError) as caught:
        load_image(cut)
    one_line(caught.value, "cut.dcm: ")
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("a text file named .dcm")
    with pytest.raises(MediaError) as caught:
        load_image(not_dicom)
    one_line(caught.value, "notes.dcm: not a DICOM file nvila-ft reads")


def test_dicom_through_the_processor(tmp_path, tiny_processor):
    shutil.copy(bundled("CT_small.dcm"), tmp_path / "ct.dcm")
    sample = tiny_processor.process(
        [{"role": "user", "content": [{"type": "image", "image": "ct.dcm"}, {"type": "text", "text": "Findings?"}]},
         {"role": "assistant", "content": "normal"}], media_root=tmp_path,
    )
    assert len(sample.images) == 1 and sample.images[0].grid == (3, 3)  # a square scan: 3x3 grid at the last scale


@pytest.mark.parametrize("name, frame", [
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", 0),  # YBR_FULL_422, JPEG baseline
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", 0),  # YBR_FULL, JPEG baseline
    ("SC_ybr_full_422_uncompressed.dcm", 0),  # YBR_FULL_422, native
    ("examples_ybr_color.dcm", 15),  # a 30-frame YBR_FULL_422 echo cine: was shown green
    ("examples_jpeg2k.dcm", 0),  # YBR_RCT, JPEG 2000 lossless: was refused
    ("GDCMJ2K_TextGBR.dcm", 0),  # YBR_RCT
])
def test_colour_is_converted_once(name, frame):
    """pydicom's decoders hand YBR data over as RGB; converting it again (as nvila-ft once did) moves every pixel."""
    from pydicom.pixels import convert_color_space

    dataset = pydicom.dcmread(str(bundled(name)))
    rgb = dataset.pixel_array[frame] if int(dataset.get("NumberOfFrames", 1) or 1) > 1 else dataset.pixel_array
    image = np.asarray(load_image(bundled(name)))
    assert np.array_equal(image, rgb)
    twice = convert_color_space(rgb, "YBR_FULL", "RGB").astype(int)
    assert np.abs(twice - image.astype(int)).max() > 40  # what this test would see if colour were converted twice


def test_sixteen_bit_rgb_is_scaled_not_clipped():
    dataset = pydicom.dcmread(str(bundled("SC_rgb_rle_16bit.dcm")))
    stored = dataset.pixel_array.astype(float)  # 0..65535 (BitsStored 16)
    image = np.asarray(load_image(bundled("SC_rgb_rle_16bit.dcm"))).astype(int)
    assert np.array_equal(image, np.round(stored / 65535 * 255).astype(int))
    assert (image == 255).mean() < 0.5  # clipped, nearly every pixel would be 255


def test_palette_colour_goes_through_its_table():
    from pydicom.pixels import apply_color_lut

    dataset = pydicom.dcmread(str(bundled("examples_palette.dcm")))  # 16-bit entries (descriptor [256, 0, 16])
    expected = np.round(apply_color_lut(dataset.pixel_array, dataset) / 65535 * 255).astype(np.uint8)
    image = np.asarray(load_image(bundled("examples_palette.dcm")))
    assert np.array_equal(image, expected)
    assert (image[..., 0] != image[..., 2]).mean() > 0.1  # colour, not the palette indices stretched to grey


def lut_file(tmp_path: Path, name: str, **sequences) -> Path:
    from pydicom.dataset import Dataset

    dataset = pydicom.dcmread(str(bundled("CT_small.dcm")))
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in dataset:
            delattr(dataset, keyword)
    for keyword, (descriptor, data) in sequences.items():
        item = Dataset()
        item.add_new("LUTDescriptor", "SS" if descriptor[1] < 0 else "US", descriptor)
        item.add_new("LUTData", "US", data)
        setattr(dataset, keyword, [item])
    dataset.save_as(str(tmp_path / name))
    return tmp_path / name


def test_voi_lut_sequence_and_modality_lut_sequence(tmp_path):
    stored = pydicom.dcmread(str(bundled("CT_small.dcm"))).pixel_array.astype(int)  # 128..2191, rescale 1/-1024
    hu = stored - 1024
    # a VOI LUT of 8-bit entries over HU -1000..-1000+4095: entry k = k // 16 (0..255), values outside clamp
    lut = [k // 16 for k in range(4096)]
    path = lut_file(tmp_path, "voi.dcm", VOILUTSequence=([4096, -1000, 8], lut))
    dataset = pydicom.dcmread(str(path))
    first = int(dataset.VOILUTSequence[0].LUTDescriptor[1])
    expected = np.array(lut)[np.clip(hu - first, 0, 4095)]
    image = np.asarray(load_image(path))[..., 0]
    assert np.array_equal(image, np.round(expected / 255 * 255).astype(np.uint8))
    # a Modality LUT of 16-bit entries: stored value v -> 2 v, then the full range (no window)
    path = lut_file(tmp_path, "modality.dcm", ModalityLUTSequence=([4096, 0, 16], [2 * k for k in range(4096)]))
    dataset = pydicom.dcmread(str(path))
    del dataset.RescaleSlope, dataset.RescaleIntercept
    dataset.save_as(str(path))
    doubled = 2 * stored
    full = np.round((doubled - doubled.min()) / (doubled.max() - doubled.min()) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(path))[..., 0], full)


def enhanced_ct(tmp_path: Path, intercepts: list[float], windows: list[tuple[float, float]]) -> tuple[Path, np.ndarray]:
    """An enhanced multi-frame CT: CT_small's pixels three times, each frame with its own rescale intercept and
    window in its per-frame functional groups (the slope, shared, in the shared group)."""
    from pydicom.dataset import Dataset

    dataset = pydicom.dcmread(str(bundled("CT_small.dcm")))
    for keyword in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if keyword in dataset:
            delattr(dataset, keyword)
    stored = dataset.pixel_array
    frames = np.stack([stored, stored + 10, stored + 20]).astype(np.int16)
    dataset.NumberOfFrames = 3
    dataset.PixelData = frames.tobytes()
    shared, transform = Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, 0, "HU"
    shared.PixelValueTransformationSequence = [transform]
    dataset.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for intercept, (centre, width) in zip(intercepts, windows):
        group, transform, window = Dataset(), Dataset(), Dataset()
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, intercept, "HU"
        window.WindowCenter, window.WindowWidth = centre, width
        group.PixelValueTransformationSequence, group.FrameVOILUTSequence = [transform], [window]
        per_frame.append(group)
    dataset.PerFrameFunctionalGroupsSequence = per_frame
    dataset.save_as(str(tmp_path / "enhanced.dcm"))
    return tmp_path / "enhanced.dcm", frames.astype(float)


def linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out: black at or below c - 0.5 - (w - 1) / 2, white above c - 0.5 + (w - 1) / 2."""
    scaled = ((values - (centre - 0.5)) / (width - 1) + 0.5) * 255
    return np.round(np.clip(scaled, 0, 255)).astype(int)


def test_enhanced_multi_frame_takes_each_frames_functional_groups(tmp_path):
    intercepts, windows = [-1024, -1000, -900], [(40, 400), (-600, 1500), (400, 1800)]
    path, frames = enhanced_ct(tmp_path, intercepts, windows)
    shown = [np.asarray(f)[..., 0].astype(int) for f in load_video(path, 3)]
    for image, values, intercept, window in zip(shown, frames, intercepts, windows):
        # one grey level: pydicom's window and this one are the same map evaluated in other orders (float64)
        assert np.abs(image - linear_window(values + intercept, *window)).max() <= 1
    assert volume_frames(path) == 3
    image = np.asarray(load_image(path))[..., 0].astype(int)  # as an image: the middle frame, its own groups
    assert np.abs(image - linear_window(frames[1] + intercepts[1], *windows[1])).max() <= 1


def test_a_multi_frame_file_given_as_an_image_follows_image_frame(tmp_path):
    source = bundled("rtdose.dcm")  # 15 grey frames, no window
    stack = pydicom.dcmread(str(source)).pixel_array.astype(float)

    def full(frame):
        return np.round((frame - frame.min()) / (frame.max() - frame.min()) * 255).astype(np.uint8)

    image = load_image(source)
    assert np.array_equal(np.asarray(image)[..., 0], full(stack[7]))
    assert image.info["note"] == "multi-frame DICOM given as an image: its middle frame (data.image_frame)"
    chosen = load_image(source, options=MediaOptions(image_frame=3))
    assert np.array_equal(np.asarray(chosen)[..., 0], full(stack[3])) and "frame 3" in chosen.info["note"]
    with pytest.raises(MediaError) as caught:
        load_image(source, options=MediaOptions(image_frame="refuse"))
    one_line(caught.value, "rtdose.dcm: a multi-frame DICOM of 15 frames given as an image", "give it as a video")
    assert caught.value.kind == "unsupported_media"
    with pytest.raises(MediaError) as caught:
        load_image(source, options=MediaOptions(image_frame=15))
    one_line(caught.value, "rtdose.dcm: data.image_frame=15, but the multi-frame DICOM has 15 frames (0-14)")
    single = load_image(bundled("CT_small.dcm"), options=MediaOptions(image_frame="refuse"))  # one frame: no rule
    assert "note" not in single.info


def test_missing_decoder_is_one_line_naming_file_syntax_and_package(monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.0")})
    with pytest.raises(MediaError) as caught:
        load_image(bundled("MR_small_jp2klossless.dcm"))
    one_line(caught.value, "MR_small_jp2klossless.dcm: its transfer syntax JPEG 2000 Image Compression (Lossless Only)",
             "1.2.840.10008.1.2.4.90", "pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0", "pip install 'nvila-ft[medical]'")
    assert caught.value.kind == "unsupported_media"


def test_an_undecodable_file_is_one_line_and_nothing_reaches_the_console(capfd, caplog):
    """pydicom logs every failed plugin with its traceback (LOGGER.exception): that goes to the log, not stderr."""
    with caplog.at_level(logging.DEBUG, logger="pydicom"), pytest.raises(MediaError) as caught:
        load_image(bundled("JPEG-lossy.dcm"))
    one_line(caught.value, "JPEG-lossy.dcm: cannot decode its JPEG Extended (Process 2 and 4)", "1.2.840.10008.1.2.4.51")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out and "pylibjpeg" not in captured.err
    assert any(record.name.startswith("pydicom") for record in caplog.records)  # kept for the run's log file


def test_without_pydicom_every_dicom_input_says_what_to_install(tmp_path, monkeypatch):
    series = tmp_path / "series"
    series.mkdir()
    for index in range(3):
        shutil.copy(bundled("CT_small.dcm"), series / f"{index}.dcm")
    shutil.copy(bundled("CT_small.dcm"), tmp_path / "ct.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` raises ImportError
    for call, name in ((lambda: load_video("series", 2, tmp_path), "series"), (lambda: load_image("series", tmp_path), "series"),
                       (lambda: volume_frames("series", tmp_path), "series"), (lambda: load_image("ct.dcm", tmp_path), "ct.dcm")):
        with pytest.raises(MediaError) as caught:
            call()
        one_line(caught.value, name, "reading DICOM needs pydicom: pip install 'nvila-ft[medical]'")
        assert caught.value.kind == "unsupported_media"


def test_the_multi_frame_rule_is_the_same_in_every_source(tmp_path, tiny_processor):
    """LLaVA JSON, a CSV table and SLAKE's layout, each with rtdose.dcm (15 frames) as a record's image: one frame
    with a note under image_frame=middle, refused under image_frame=refuse, in all three alike."""
    import json

    from nvila_ft.domains.medical.sources import MedicalVQA
    from nvila_ft.data.llava import LlavaJson
    from nvila_ft.data.tables import TableSource
    from nvila_ft.data.validation import validate_source

    (tmp_path / "imgs").mkdir()
    shutil.copy(bundled("rtdose.dcm"), tmp_path / "imgs" / "dose.dcm")
    (tmp_path / "llava.json").write_text(json.dumps([{"image": "imgs/dose.dcm", "conversations": [
        {"from": "human", "value": "<image>\nDose?"}, {"from": "gpt", "value": "high"}]}]))
    (tmp_path / "table.csv").write_text("image,question,answer\nimgs/dose.dcm,Dose?,high\n")
    (tmp_path / "slake.json").write_text(json.dumps([{"qid": 1, "img_name": "dose.dcm", "question": "Dose?",
                                                      "answer": "High", "answer_type": "OPEN", "q_lang": "en"}]))
    sources = [LlavaJson(str(tmp_path / "llava.json")), TableSource(str(tmp_path / "table.csv")),
               MedicalVQA(str(tmp_path / "slake.json"), "slake")]
    refusing = tiny_processor.__class__(tiny_processor.tokenizer, tiny_processor.config, image_frame="refuse")
    for source in sources:
        report = validate_source(source, tiny_processor)
        assert len(report.good) == 1 and dict(report.notes) == {
            "multi-frame DICOM given as an image: its middle frame (data.image_frame)": 1}
        [bad] = validate_source(source, refusing).bad
        assert bad.kind == "unsupported_media" and "dose.dcm: a multi-frame DICOM of 15 frames given as an image" in bad.line()


def test_validate_data_console_holds_the_report_and_the_log_file_holds_pydicom(tmp_path):
    """Was: pydicom's traceback of each failed decoder plugin printed on the console although the record was
    handled, and its warnings (an invalid IS value) with it."""
    import json

    from tests.test_cli import run_cli

    for name in ("JPEG-lossy.dcm", "badVR.dcm", "MR_small.dcm", "SC_rgb_jpeg.dcm"):
        shutil.copy(bundled(name), tmp_path / name)
    records = [{"image": name, "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
               for name in ("JPEG-lossy.dcm", "badVR.dcm", "MR_small.dcm", "SC_rgb_jpeg.dcm")]
    (tmp_path / "train.json").write_text(json.dumps(records))
    run = tmp_path / "run"
    result = run_cli(["validate-data", "task=vqa", f"task.train.path={tmp_path / 'train.json'}", "task.val_fraction=0",
                      f"hydra.run.dir={run}"], tmp_path, tmp_path / "cache", check=False)
    console = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in console and "Warning" not in console, console[-3000:]
    assert "train.json[0]: corrupt_media:" in console and "train.json[1]: corrupt_media:" in console
    assert "4 records: 2 ok, 2 bad" in console
    log = (run / "cli.log").read_text()
    assert "[pydicom]" in log and "Traceback" in log  # what pydicom logged, kept for whoever needs it
