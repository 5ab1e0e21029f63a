"""DICOM display windows, multi-frame files and folder series as videos, against independent numpy sums.

The window is DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) written out here again: values at or below
c - 0.5 - (w - 1) / 2 are black, above c - 0.5 + (w - 1) / 2 white, linear in between.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nvila_ft.data.display_window import DICOM_WINDOWS
from nvila_ft.data.media import MediaError, load_image, load_video, volume_frames
from nvila_ft.data.media_base import MediaOptions
from nvila_ft.training.config import ConfigError, DataOptions

from tests.test_dicom import bundled, pydicom  # pydicom's real CT / MR files (skipped without pydicom)
from tests.tolerances import worst


def linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    low, high = centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
    out = np.empty_like(values, dtype=float)
    out[values <= low] = 0
    out[values > high] = 255
    inside = (values > low) & (values <= high)
    out[inside] = ((values[inside] - (centre - 0.5)) / (width - 1) + 0.5) * 255
    return np.round(out).astype(np.uint8)


def grey(image) -> np.ndarray:
    array = np.asarray(image)
    assert np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])
    return array[..., 0]


def edited(tmp_path: Path, name: str, target: str, **changes) -> Path:
    dataset = pydicom.dcmread(str(bundled(name)))
    for key, value in changes.items():
        setattr(dataset, key, value)
    dataset.save_as(str(tmp_path / target))
    return tmp_path / target


@pytest.mark.parametrize("window", ["lung", "bone", "brain", "mediastinum", "soft_tissue", [40, 400]])
def test_ct_window_matches_numpy(window):
    source = bundled("CT_small.dcm")
    dataset = pydicom.dcmread(str(source))
    hu = dataset.pixel_array.astype(float) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    centre, width = DICOM_WINDOWS[window] if isinstance(window, str) else window
    array = grey(load_image(source, options=MediaOptions(dicom_window=window)))
    assert np.array_equal(array, linear_window(hu, centre, width))
    # the familiar bounds: black up to c - w/2, white from c + w/2
    assert (array[hu <= centre - width / 2] == 0).all() and (array[hu >= centre + width / 2] == 255).all()


def test_presets_are_the_stated_values():
    assert DICOM_WINDOWS["lung"] == (-600, 1500) and DICOM_WINDOWS["bone"] == (400, 1800)
    assert DICOM_WINDOWS["brain"] == (40, 80) and DICOM_WINDOWS["mediastinum"] == (50, 350)
    assert DICOM_WINDOWS["soft_tissue"] == DICOM_WINDOWS["abdomen"] == (50, 400)


def test_file_window_first_value_full_range_and_rescale(tmp_path):
    mr = bundled("MR_small.dcm")  # WindowCenter 600, WindowWidth 1600, no rescale
    values = pydicom.dcmread(str(mr)).pixel_array.astype(float)
    assert np.array_equal(grey(load_image(mr)), linear_window(values, 600, 1600))
    multi = edited(tmp_path, "MR_small.dcm", "multi.dcm", WindowCenter=[300, 600], WindowWidth=[400, 1600])
    assert np.array_equal(grey(load_image(multi)), linear_window(values, 300, 400))
    full = np.round((values - values.min()) / (values.max() - values.min()) * 255).astype(np.uint8)
    assert np.array_equal(grey(load_image(mr, options=MediaOptions(dicom_window="full"))), full)
    rescaled = edited(tmp_path, "CT_small.dcm", "rescaled.dcm", RescaleSlope=2, RescaleIntercept=-100)
    stored = pydicom.dcmread(str(rescaled)).pixel_array.astype(float)
    assert np.array_equal(grey(load_image(rescaled, options=MediaOptions(dicom_window=[1000, 2000]))), linear_window(2 * stored - 100, 1000, 2000))


def test_monochrome1_is_inverted(tmp_path):
    inverted = edited(tmp_path, "CT_small.dcm", "m1.dcm", PhotometricInterpretation="MONOCHROME1")
    normal = grey(load_image(bundled("CT_small.dcm"), options=MediaOptions(dicom_window="lung"))).astype(int)
    assert np.array_equal(grey(load_image(inverted, options=MediaOptions(dicom_window="lung"))), 255 - normal)


def test_multi_frame_dicom_is_a_video():
    source = bundled("rtdose.dcm")  # 15 grey frames, no window: the full range of the sampled frames
    stack = pydicom.dcmread(str(source)).pixel_array.astype(float)
    frames = load_video(source, 4)
    chosen = stack[[0, 5, 9, 14]]  # round(linspace(0, 14, 4))
    expected = np.round((chosen - chosen.min()) / (chosen.max() - chosen.min()) * 255).astype(np.uint8)
    assert len(frames) == 4 and all(np.array_equal(grey(f), e) for f, e in zip(frames, expected))
    assert volume_frames(source) == 15
    colour = load_video(bundled("SC_rgb_rle_2frame.dcm"), 2)
    assert np.array_equal(np.asarray(colour[1]), pydicom.dcmread(str(bundled("SC_rgb_rle_2frame.dcm"))).pixel_array[1])


def write_series(folder: Path, slices: list[dict], values: list[int]) -> None:
    """Copies of CT_small, one constant slice each, named in an order that is NOT the anatomical one."""
    folder.mkdir()
    for index, (changes, value) in enumerate(zip(slices, values)):
        dataset = pydicom.dcmread(str(bundled("CT_small.dcm")))
        for key, item in changes.items():
            if item is None:
                delattr(dataset, key)
            else:
                setattr(dataset, key, item)
        dataset.PixelData = np.full((128, 128), value, dtype=np.int16).tobytes()
        dataset.save_as(str(folder / f"slice_{index}.dcm"))


def test_series_folder_is_ordered_by_instance_number_then_position(tmp_path):
    # file names 0..3, InstanceNumber 3,1,4,2: anatomical order is files 1,3,0,2 -> values 100,300,0,200
    write_series(tmp_path / "by_number", [{"InstanceNumber": n} for n in (3, 1, 4, 2)], [0, 100, 200, 300])
    frames = load_video(tmp_path / "by_number", 4, options=MediaOptions(dicom_window=[1000 - 1024 + 150, 301]))
    # one window for the volume: HU = value - 1024, windowed by the linear function
    expected = [linear_window(np.array([v - 1024.0]), 1000 - 1024 + 150, 301)[0] for v in (100, 300, 0, 200)]
    assert [int(grey(f)[0, 0]) for f in frames] == expected
    # without InstanceNumber: by position along the slice normal (z here, orientation axial), not by name
    slices = [{"InstanceNumber": None, "ImagePositionPatient": [0, 0, z]} for z in (20.0, -10.0, 5.0)]
    write_series(tmp_path / "by_position", slices, [0, 100, 200])
    frames = load_video(tmp_path / "by_position", 3)  # full range of the volume: 0 -> 0, 100 -> 128, 200 -> 255
    assert [int(grey(f)[0, 0]) for f in frames] == [128, 255, 0]
    assert volume_frames(tmp_path / "by_position") == 3


def test_series_problems_name_the_folder(tmp_path):
    write_series(tmp_path / "two", [{"SeriesInstanceUID": "1.2.3"}, {"SeriesInstanceUID": "1.2.4"}], [0, 1])
    with pytest.raises(MediaError, match="two: holds 2 DICOM series"):
        load_video(tmp_path / "two", 2)
    write_series(tmp_path / "mixed", [{}], [0])
    (tmp_path / "mixed" / "notes.txt").write_text("x")
    with pytest.raises(MediaError, match="mixes DICOM slices with other files"):
        load_video(tmp_path / "mixed", 2)


def test_dicom_window_config():
    assert DataOptions(dicom_window="lung").processor_options()["dicom_window"] == "lung"
    assert DataOptions(dicom_window=[40, 400]).processor_options()["dicom_window"] == [40.0, 400.0]
    with pytest.raises(ConfigError, match="data.dicom_window: unknown DICOM window 'lungs'"):
        DataOptions(dicom_window="lungs")
    with pytest.raises(ConfigError, match="width must be >= 1"):
        DataOptions(dicom_window=[40, 0])


def test_processor_measures_and_loads_a_dicom_series(tmp_path):
    from nvila_ft.data.processor import NVILAProcessor, SampleError
    from nvila_ft.model.presets import preset_config
    from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
    from nvila_ft.model.tokenizer import load_tokenizer

    write_series(tmp_path / "study", [{"InstanceNumber": n} for n in range(1, 6)], [0, 50, 100, 150, 200])
    shutil.copy(bundled("rtdose.dcm"), tmp_path / "dose.dcm")
    processor = NVILAProcessor(load_tokenizer(TINY_TOKENIZER_DIR), preset_config("nvila-8b-tiny"), media_root=tmp_path,
                               dicom_window="abdomen")
    for video in ("study", "dose.dcm"):
        messages = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "Findings?"}]},
                    {"role": "assistant", "content": "normal"}]
        sample = processor.process(messages)
        assert sample.videos[0].shape[0] == processor.num_video_frames
        assert processor.measure(messages).positions == sample.length
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 10)
    broken = [{"role": "user", "content": [{"type": "video", "video": "broken.dcm"}, {"type": "text", "text": "?"}]},
              {"role": "assistant", "content": "x"}]
    with pytest.raises(SampleError, match="broken.dcm: not a DICOM file nvila-ft reads"):
        processor.measure(broken)


def test_window_functions_by_hand_and_against_pydicom():
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID) at c=40, w=80, worked
    out by hand, and equal to pydicom's own `apply_windowing` rescaled to 0..255."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    from nvila_ft.data.display_window import apply_window

    x = np.array([0.0, 0.5, 40.0, 78.9, 79.0, 79.5])
    # LINEAR: black at or below 40 - 0.5 - 79/2 = 0, white above 40 - 0.5 + 79/2 = 79, else ((x-39.5)/79+0.5)*255
    linear = [0.0, (-39 / 79 + 0.5) * 255, (0.5 / 79 + 0.5) * 255, (39.4 / 79 + 0.5) * 255, 255.0, 255.0]
    close = 255 * worst(8, torch.float64)  # a few float64 operations on each side, on a 0..255 scale
    assert apply_window(x, 40, 80) == pytest.approx(linear, abs=close)
    exact = [0.0, (-39.5 / 80 + 0.5) * 255, 127.5, (38.9 / 80 + 0.5) * 255, (39 / 80 + 0.5) * 255, (39.5 / 80 + 0.5) * 255]
    assert apply_window(x, 40, 80, "LINEAR_EXACT") == pytest.approx(exact, abs=close)
    assert apply_window(np.array([40.0, 60.0]), 40, 80, "SIGMOID") == pytest.approx([127.5, 255 / (1 + np.exp(-1))], abs=close)
    assert apply_window(np.array([9.4, 9.5, 9.6]), 10, 1).tolist() == [0.0, 0.0, 255.0]  # w = 1: a threshold at c - 0.5

    dataset = Dataset()
    dataset.PhotometricInterpretation, dataset.BitsStored, dataset.PixelRepresentation = "MONOCHROME2", 8, 0
    dataset.WindowCenter, dataset.WindowWidth = 40, 80
    for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        dataset.VOILUTFunction = function
        theirs = apply_windowing(x.copy(), dataset)  # output range 0..255 for 8 unsigned bits
        assert apply_window(x, 40, 80, function) == pytest.approx(theirs, abs=close), function
