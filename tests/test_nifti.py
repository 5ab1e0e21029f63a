"""NIfTI volumes as media: canonical orientation whatever the storage order, the radiological view, HU windows,
slices as video frames, one slice as an image, and what cannot be read refused on one line."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest

from nvila_ft.data.display_window import DICOM_WINDOWS
from nvila_ft.data.media import MediaError, image_size, load_image, load_video, volume_frames
from nvila_ft.data.media_base import MediaOptions, sample_frame_indices
from tests.medical_reference import nifti_slices

nibabel = pytest.importorskip("nibabel")

SHAPE = (20, 24, 16)  # x (left -> right), y (posterior -> anterior), z (inferior -> superior) in RAS+


def ct_volume() -> np.ndarray:
    """HU values: air -1000 around a soft-tissue body (40), a bright block (bone, 700) at the patient's right,
    anterior, superior corner, and a slice-number ramp so slices can be told apart."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    volume = np.full(SHAPE, -1000.0)
    volume[2:18, 2:22, :] = 40.0 + z[2:18, 2:22, :]
    volume[15:18, 18:22, 12:16] = 700.0  # x high = right, y high = anterior, z high = superior
    return volume


def in_top_left(view: np.ndarray) -> bool:
    """Whether the brightest pixels (the block) lie in the view's top-left quarter, and only there."""
    rows, columns = np.nonzero(view == view.max())
    return rows.max() < view.shape[0] // 2 and columns.max() < view.shape[1] // 2


def save(path, data: np.ndarray, affine: np.ndarray, **header) -> str:
    image = nibabel.Nifti1Image(data.astype(np.float32), affine)
    for key, value in header.items():
        image.header[key] = value
    nibabel.save(image, str(path))
    return str(path)


def test_the_radiological_view_whatever_the_storage_order(tmp_path):
    """The same body stored RAS+ and LPS+ (x and y reversed, as DICOM-converted files often are) shows the same
    axial slice: anterior at the top, the patient's right on the left of the image."""
    volume = ct_volume()
    ras = save(tmp_path / "ras.nii.gz", volume, np.diag([1.0, 1.0, 1.0, 1.0]))
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine[:3, 3] = [SHAPE[0] - 1, SHAPE[1] - 1, 0]
    lps = save(tmp_path / "lps.nii", volume[::-1, ::-1, :], lps_affine)
    options = MediaOptions(dicom_window="bone", image_frame=14)
    top = np.asarray(load_image(ras, options=options))[..., 0]
    assert np.array_equal(top, np.asarray(load_image(lps, options=options))[..., 0])
    assert top.shape == (SHAPE[1], SHAPE[0])  # rows: y, columns: x
    assert in_top_left(top)  # the right anterior block
    assert np.array_equal(top, nifti_slices(ras, [14], window=DICOM_WINDOWS["bone"])[0][..., 0])
    coronal = np.asarray(load_image(ras, options=MediaOptions(volume_axis="coronal", dicom_window="bone", image_frame=20)))[..., 0]
    assert coronal.shape == (SHAPE[2], SHAPE[0])  # rows: z (superior at the top), columns: x (right on the left)
    assert in_top_left(coronal)
    sagittal = np.asarray(load_image(ras, options=MediaOptions(volume_axis="sagittal", dicom_window="bone", image_frame=16)))[..., 0]
    assert sagittal.shape == (SHAPE[2], SHAPE[1])  # rows: z, columns: y (anterior on the left)
    assert in_top_left(sagittal)


def test_windows_in_hounsfield_units_and_the_files_own_display_range(tmp_path):
    volume = ct_volume()
    scaled = tmp_path / "scaled.nii.gz"  # stored as int16 with scl_slope 2, scl_inter -1024: HU by nibabel's scaling
    image = nibabel.Nifti1Image(np.round((volume + 1024) / 2).astype(np.int16), np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    nibabel.save(image, str(scaled))
    hu = np.round((volume + 1024) / 2) * 2 - 1024
    view = hu[:, :, 8].T[::-1, ::-1]
    centre, width = DICOM_WINDOWS["soft_tissue"]
    shown = np.asarray(load_image(scaled, options=MediaOptions(dicom_window="soft_tissue")))[..., 0].astype(int)
    by_hand = np.round(np.clip(((view - (centre - 0.5)) / (width - 1) + 0.5) * 255, 0, 255)).astype(int)
    assert np.array_equal(shown, by_hand)
    ranged = save(tmp_path / "cal.nii", volume, np.eye(4), cal_min=-100.0, cal_max=100.0)  # the file's display range
    shown = np.asarray(load_image(ranged))[..., 0].astype(int)
    by_hand = np.round(np.clip((volume[:, :, 8].T[::-1, ::-1] + 100) / 200 * 255, 0, 255)).astype(int)
    assert np.array_equal(shown, by_hand)
    full = np.asarray(load_image(ranged, options=MediaOptions(dicom_window="full")))[..., 0]
    assert full.min() == 0 and full.max() == 255  # "full" ignores cal_min / cal_max


def test_a_volume_as_video_gives_evenly_spaced_slices(tmp_path, tiny_processor):
    path = save(tmp_path / "ct.nii.gz", ct_volume(), np.eye(4))
    frames = load_video(path, 4, options=MediaOptions(dicom_window="brain"))
    wanted = sample_frame_indices(SHAPE[2], 4)  # slices 0, 5, 10, 15
    assert [np.asarray(f).tolist() for f in frames] == [r.tolist() for r in nifti_slices(path, wanted, window=DICOM_WINDOWS["brain"])]
    ranged = load_video(path, 3, options=MediaOptions(dicom_window="brain", volume_slices=[4, 8]))
    expected = nifti_slices(path, [4, 6, 8], window=DICOM_WINDOWS["brain"])
    assert all(np.array_equal(np.asarray(f), e) for f, e in zip(ranged, expected))
    assert volume_frames(path) == 16 and volume_frames(path, options=MediaOptions(volume_slices=[4, 8])) == 5
    assert image_size(path) == (20, 24) and image_size(path, options=MediaOptions(volume_axis="sagittal")) == (24, 16)
    with pytest.raises(MediaError) as caught:
        load_video(path, 3, options=MediaOptions(volume_slices=[4, 16]))
    assert "ct.nii.gz: data.volume_slices=[4, 16], but the volume has 16 axial slices (0-15)" in str(caught.value)

    messages = [{"role": "user", "content": [{"type": "video", "video": "ct.nii.gz"}, {"type": "text", "text": "Findings?"}]},
                {"role": "assistant", "content": "normal"}]
    sample = tiny_processor.process(messages, media_root=tmp_path)
    assert sample.videos[0].shape[0] == tiny_processor.num_video_frames
    assert tiny_processor.measure(messages, media_root=tmp_path).positions == sample.length  # the planner counts it
    as_image = [{"role": "user", "content": [{"type": "image", "image": "ct.nii.gz"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "normal"}]
    sample = tiny_processor.process(as_image, media_root=tmp_path)
    assert sample.notes == ["NIfTI volume given as an image: its middle frame (data.image_frame)"]
    assert tiny_processor.measure(as_image, media_root=tmp_path).positions == sample.length


def test_what_is_not_a_3d_volume_is_refused_on_one_line(tmp_path, monkeypatch):
    four_d = save(tmp_path / "bold.nii.gz", np.zeros((4, 4, 3, 5)), np.eye(4))
    one_time_point = save(tmp_path / "one.nii.gz", np.arange(48.0).reshape(4, 4, 3, 1), np.eye(4))
    assert np.asarray(load_image(one_time_point)).shape == (4, 4, 3)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress((tmp_path / "one.nii.gz").read_bytes())[:60])
    mgz = tmp_path / "brain.mgz"
    mgz.write_bytes(b"\0" * 10)
    for path, kind, words in ((four_d, "unsupported_media", "a 4-D NIfTI image of shape (4, 4, 3, 5)"),
                              (cut, "corrupt_media", "cannot read the NIfTI"),
                              (mgz, "unsupported_media", "a FreeSurfer MGH volume; nvila-ft reads NIfTI volumes")):
        with pytest.raises(MediaError) as caught:
            load_image(path)
        assert caught.value.kind == kind and words in str(caught.value) and "\n" not in str(caught.value)
        assert str(path) in str(caught.value)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(MediaError) as caught:
        load_video(one_time_point, 2)
    assert "one.nii.gz: reading NIfTI needs nibabel: pip install 'nvila-ft[medical]'" in str(caught.value)
