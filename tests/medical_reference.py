"""Independent renderings of DICOM and NIfTI files, made with the libraries' own public functions only: what
nvila-ft's media loader is checked against (tests/test_dicom.py, tests/test_nifti.py, tests/test_library_test_files.py).

DICOM (PS3.3 C.11): `Dataset.pixel_array` (pydicom converts YBR_FULL / YBR_FULL_422 to RGB, its JPEG 2000 decoder
undoes YBR_ICT / YBR_RCT), then for grey frames `apply_modality_lut` and the VOI (`apply_voi` for a VOI LUT
Sequence, scaled from the LUT's bits; `apply_windowing`, scaled from its output range, the modality output range
written out below; no window: the frames' own range), MONOCHROME1 inverted; PALETTE COLOR by `apply_color_lut`
scaled from the table's bits; RGB of more than 8 bits scaled from BitsStored.
NIfTI: `nibabel.as_closest_canonical(...).get_fdata()`, the slice across the axis transposed and flipped both ways
(the radiological view), cal_min / cal_max or the shown slices' range.
"""

from __future__ import annotations

import copy

import numpy as np

GREY = ("MONOCHROME1", "MONOCHROME2")


def _to_8_bits(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """[low, high] -> 0..255; NaN (voxels outside a resampled field of view) shows as low, black."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=low)
    scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros(np.shape(values))
    return np.round(np.clip(scaled, 0, 255)).astype(np.uint8)


def windowing_output_range(dataset) -> tuple[float, float]:
    """PS3.3 C.11.2.1.2: the windowing output spans the modality output range: the Modality LUT's entries, else
    the stored range (BitsStored, PixelRepresentation) through the rescale."""
    if dataset.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** int(dataset.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    bits = int(dataset.BitsStored)
    low, high = (0.0, 2.0**bits - 1) if int(dataset.PixelRepresentation) == 0 else (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    if dataset.get("RescaleSlope") is not None and dataset.get("RescaleIntercept") is not None:
        slope, intercept = float(dataset.RescaleSlope), float(dataset.RescaleIntercept)
        low, high = low * slope + intercept, high * slope + intercept
    return low, high


def dicom_frames(path, frames: list[int] | None = None, window: tuple[float, float] | str | None = None) -> list[np.ndarray]:
    """Frames of a DICOM file as [rows, columns, 3] uint8 (None: the middle frame, frame count // 2)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing

    dataset = pydicom.dcmread(str(path))
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    stack = dataset.pixel_array if count > 1 else dataset.pixel_array[np.newaxis]
    chosen = stack[[count // 2] if frames is None else frames]
    photometric = dataset.PhotometricInterpretation
    if photometric in GREY:
        values = apply_modality_lut(chosen, dataset)
        lut = dataset.get("VOILUTSequence")
        if isinstance(window, tuple):
            windowed = copy.deepcopy(dataset)
            windowed.WindowCenter, windowed.WindowWidth, windowed.VOILUTFunction = window[0], window[1], "LINEAR"
            grey = _to_8_bits(apply_windowing(values, windowed), *windowing_output_range(windowed))
        elif window is None and lut:
            bits = int(lut[0].LUTDescriptor[2])
            wide = copy.deepcopy(dataset)  # pydicom 3.0 wraps the indices of 8-bit entries past 255: read them as 16
            wide.VOILUTSequence[0].LUTDescriptor = [*lut[0].LUTDescriptor[:2], 16]
            grey = _to_8_bits(apply_voi(np.round(values).astype(np.int64), wide), 0, 2.0**bits - 1)
        elif window is None and dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None:
            grey = _to_8_bits(apply_windowing(values, dataset), *windowing_output_range(dataset))
        else:
            values = np.asarray(values, dtype=np.float64)
            grey = _to_8_bits(values, values.min(), values.max())
        if photometric == "MONOCHROME1":
            grey = 255 - grey
        return [np.stack([g] * 3, axis=-1) for g in grey]
    if photometric == "PALETTE COLOR":
        bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        return [_to_8_bits(apply_color_lut(frame, dataset), 0, 2.0**bits - 1) for frame in chosen]
    bits = int(dataset.BitsStored)
    return [frame.astype(np.uint8) if bits <= 8 else _to_8_bits(frame, 0, 2.0**bits - 1) for frame in chosen]


NIFTI_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def nifti_slices(path, slices: list[int] | None = None, axis: str = "axial", window=None) -> list[np.ndarray]:
    """Slices of a NIfTI volume as [rows, columns, 3] uint8 (None: the middle one), in the radiological view."""
    import nibabel

    image = nibabel.as_closest_canonical(nibabel.load(str(path)))
    data = image.get_fdata()
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    along = NIFTI_AXES[axis]
    chosen = [data.shape[along] // 2] if slices is None else slices
    views = np.stack([np.take(data, index, axis=along).T[::-1, ::-1] for index in chosen])
    low, high = float(image.header["cal_min"]), float(image.header["cal_max"])
    if isinstance(window, tuple):
        centre, width = window  # PS3.3 C.11.2.1.2.1, LINEAR
        scaled = np.clip(((views - (centre - 0.5)) / (width - 1) + 0.5) * 255.0, 0, 255)
        grey = np.round(scaled).astype(np.uint8)
    elif window is None and high > low:
        grey = _to_8_bits(views, low, high)
    else:
        grey = _to_8_bits(views, np.nanmin(views), np.nanmax(views))
    return [np.stack([g] * 3, axis=-1) for g in grey]
