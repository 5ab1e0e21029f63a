"""DICOM images (medical users' usual format) through load_image, checked against pydicom's own arrays."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from nvila_ft.data.media import MediaError, is_dicom, load_image

pydicom = pytest.importorskip("pydicom")
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def bundled(name: str) -> Path:
    path = TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not bundled with this pydicom")
    return path


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
    broken.write_bytes(bundled("CT_small.dcm").read_bytes()[:600])
    with pytest.raises(MediaError, match="broken.dcm: cannot decode DICOM"):
        load_image(broken)


def test_dicom_through_the_processor(tmp_path):
    from nvila_ft.data.processor import NVILAProcessor
    from nvila_ft.model.presets import preset_config
    from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
    from nvila_ft.model.tokenizer import load_tokenizer

    shutil.copy(bundled("CT_small.dcm"), tmp_path / "ct.dcm")
    processor = NVILAProcessor(load_tokenizer(TINY_TOKENIZER_DIR), preset_config("nvila-8b-tiny"), media_root=tmp_path)
    sample = processor.process(
        [{"role": "user", "content": [{"type": "image", "image": "ct.dcm"}, {"type": "text", "text": "Findings?"}]},
         {"role": "assistant", "content": "normal"}]
    )
    assert len(sample.images) == 1 and sample.images[0].grid == (3, 3)  # a square scan: 3x3 grid at the last scale
