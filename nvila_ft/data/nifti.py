"""NIfTI volumes (`.nii`, `.nii.gz`: CT, MR, PET as most public 3-D research data ship) as 8-bit RGB slices.

A volume is read through nibabel in its closest canonical orientation (RAS+), so slices across `volume_axis`
are the usual views whatever the scanner's storage order: axial (across the third axis, inferior to superior),
coronal, sagittal. Each slice is shown as a radiologist's viewer shows it: anterior (axial) or superior (coronal,
sagittal) at the top, the patient's right on the left of an axial or coronal slice, anterior on the left of a
sagittal one. Values are nibabel's scaled ones (scl_slope / scl_inter: Hounsfield units for CT), windowed like
DICOM: a preset or [centre, width] (`data.dicom_window`), "full" (the shown slices' range), or by default the
file's own display range (cal_min / cal_max), else the full range. As a video a volume gives `num_video_frames`
evenly spaced slices (of `volume_slices` when set); as an image, one slice (`data.image_frame`). 4-D volumes of
more than one time point are refused: split them (e.g. nibabel's `four_to_three`).
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from nvila_ft.data.display_window import apply_window, check_dicom_window, map_range, stretch, to_uint8
from nvila_ft.data.media_base import (
    VOLUME_AXES,
    MediaError,
    MediaOptions,
    first_line,
    image_frame_index,
    library_messages,
    sample_frame_indices,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Volume formats nibabel reads that nvila-ft does not (no orientation it can trust, or rarely shared): named when
# met, with the conversion to NIfTI.
OTHER_VOLUME_FORMATS = {
    ".mgz": "a FreeSurfer MGH", ".mgh": "a FreeSurfer MGH", ".mnc": "a MINC", ".par": "a Philips PAR/REC",
    ".rec": "a Philips PAR/REC", ".head": "an AFNI BRIK/HEAD", ".brik": "an AFNI BRIK/HEAD",
    ".brik.gz": "an AFNI BRIK/HEAD", ".hdr": "an Analyze or NIfTI-pair", ".img": "an Analyze or NIfTI-pair",
}

logging.getLogger("nibabel").addHandler(logging.NullHandler())


def is_nifti(path: pathlib.Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def refuse_other_volume(path: pathlib.Path) -> None:
    """MediaError for a volume in a format other than NIfTI (by its name), saying how to convert it."""
    name = path.name.lower()
    kind = next((what for suffix, what in OTHER_VOLUME_FORMATS.items() if name.endswith(suffix)), None)
    if kind is not None:
        raise MediaError(f"{path}: {kind} volume; nvila-ft reads NIfTI volumes (.nii, .nii.gz): convert it, e.g. "
                         "nibabel.save(nibabel.load(path), 'volume.nii.gz')", kind="unsupported_media")


def _image(path: pathlib.Path) -> Any:
    """The image as stored (its header read, its data not), refusing what is not a grey 2-D or 3-D volume."""
    try:
        import nibabel
    except ImportError:
        raise MediaError(f"{path}: reading NIfTI needs nibabel: pip install 'nvila-ft[medical]'",
                         kind="unsupported_media") from None
    try:
        with library_messages("nibabel", path):
            image = nibabel.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises many types for files it cannot parse
        raise MediaError(f"{path}: cannot read the NIfTI file ({first_line(e)})") from e
    if not isinstance(image, nibabel.spatialimages.SpatialImage) or image.affine is None:
        raise MediaError(f"{path}: a {type(image).__name__}, not a NIfTI volume with a spatial orientation",
                         kind="unsupported_media")
    shape = tuple(int(n) for n in image.shape)
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise MediaError(f"{path}: a {len(shape)}-D NIfTI image of shape {shape}; nvila-ft reads 3-D volumes: split "
                         "it into one file per volume (e.g. nibabel.funcs.four_to_three)", kind="unsupported_media")
    if len(shape) < 2 or np.dtype(image.get_data_dtype()).kind not in "biuf":
        raise MediaError(f"{path}: a NIfTI image of shape {shape} and type {image.get_data_dtype()}; nvila-ft reads "
                         "grey 2-D or 3-D volumes", kind="unsupported_media")
    return image


def _volume(path: pathlib.Path) -> Any:
    """The image, reoriented to RAS+ (lazily: the data of an image already in RAS+ is not read here)."""
    image = _image(path)  # first: it says what to install when nibabel is missing
    import nibabel

    try:
        with library_messages("nibabel", path):
            return nibabel.as_closest_canonical(image)
    except Exception as e:  # noqa: BLE001 - a broken affine or truncated data
        raise MediaError(f"{path}: cannot orient the NIfTI volume ({first_line(e)})") from e


def _canonical_shape(path: pathlib.Path) -> tuple[int, ...]:
    """The shape the volume has in RAS+, from its header and affine alone (reorienting would read the data)."""
    image = _image(path)  # first: it says what to install when nibabel is missing
    import nibabel

    if len(image.shape) == 2:
        return tuple(int(n) for n in image.shape)
    try:
        targets = nibabel.io_orientation(image.affine)[:3, 0]
    except Exception as e:  # noqa: BLE001 - a broken affine
        raise MediaError(f"{path}: cannot orient the NIfTI volume ({first_line(e)})") from e
    shape = [0, 0, 0]
    for axis, target in enumerate(targets):
        shape[int(target)] = int(image.shape[axis])
    return tuple(shape)


def _axis_and_range(shape: tuple[int, ...], options: MediaOptions, path: pathlib.Path) -> tuple[int, int, int]:
    """(axis, first slice, slice count) of the slices frames are taken from, for a volume of RAS+ `shape` (a 2-D
    image: its one slice)."""
    if len(shape) == 2:
        return VOLUME_AXES["axial"], 0, 1
    axis = VOLUME_AXES[options.volume_axis]
    count = int(shape[axis])
    if options.volume_slices is None:
        return axis, 0, count
    first, last = options.volume_slices
    if last >= count:
        raise MediaError(f"{path}: data.volume_slices=[{first}, {last}], but the volume has {count} "
                         f"{options.volume_axis} slices (0-{count - 1})", kind="unsupported_media")
    return axis, first, last - first + 1


def slice_size(path: pathlib.Path, options: MediaOptions) -> tuple[int, int]:
    """(width, height) of the volume's slices across `volume_axis`, from its header."""
    shape = _canonical_shape(path)
    if len(shape) == 2:
        return shape[0], shape[1]
    x, y, z = shape
    return {"axial": (x, y), "coronal": (x, z), "sagittal": (y, z)}[options.volume_axis]


def header_frames(path: pathlib.Path, options: MediaOptions) -> int:
    """The slices a video of this volume is sampled from, from its header."""
    return _axis_and_range(_canonical_shape(path), options, path)[2]


def _slices(image: Any, axis: int, indices: Sequence[int], path: pathlib.Path) -> np.ndarray:
    """Slices `indices` across `axis` as [n, rows, columns] float64 arrays in display orientation."""
    slices = []
    try:
        with library_messages("nibabel", path):
            for index in indices:
                key = [slice(None)] * len(image.shape)
                if len(key) > 2:
                    key[axis] = index
                data = np.asarray(image.dataobj[tuple(key)], dtype=np.float64)
                slices.append(data.reshape(data.shape[:2]))  # what remains past the plane has length 1
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data (EOFError, zlib.error, OSError, ...)
        raise MediaError(f"{path}: cannot read the NIfTI data ({first_line(e)})") from e
    # a slice of RAS+ data is [first remaining axis, second]: transposed, then rows run up and columns leftwards
    return np.stack([data.T[::-1, ::-1] for data in slices])


def _display(values: np.ndarray, image: Any, options: MediaOptions) -> np.ndarray:
    setting = check_dicom_window(options.dicom_window)
    if isinstance(setting, tuple):
        return apply_window(values, *setting)
    low, high = float(image.header.get("cal_min", 0) or 0), float(image.header.get("cal_max", 0) or 0)
    if setting is None and np.isfinite(low) and np.isfinite(high) and high > low:
        return map_range(values, low, high)
    return stretch(values)


def load_slices(path: pathlib.Path, image: Any, axis: int, indices: Sequence[int], options: MediaOptions) -> list[Image.Image]:
    values = _slices(image, axis, indices, path)
    if values.size == 0:
        raise MediaError(f"{path}: NIfTI volume has zero size")
    grey = to_uint8(_display(values, image, options))
    return [Image.fromarray(np.ascontiguousarray(g), "L").convert("RGB") for g in grey]


def load_image(path: pathlib.Path, options: MediaOptions) -> tuple[Image.Image, str | None]:
    """One slice of the volume (by `options.image_frame`; a single-slice file is its slice), and a note."""
    image = _volume(path)
    axis, first, count = _axis_and_range(tuple(image.shape[:3]), options, path)
    if count == 1:
        return load_slices(path, image, axis, [first], options)[0], None
    index, note = image_frame_index(count, options, path, "NIfTI volume")
    return load_slices(path, image, axis, [first + index], options)[0], note


def load_video(path: pathlib.Path, num_frames: int, options: MediaOptions) -> list[Image.Image]:
    """`num_frames` evenly spaced slices of the volume (of `volume_slices` when set), displayed together."""
    image = _volume(path)
    axis, first, count = _axis_and_range(tuple(image.shape[:3]), options, path)
    return load_slices(path, image, axis, [first + i for i in sample_frame_indices(count, num_frames)], options)
