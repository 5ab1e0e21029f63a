"""Display windows of medical grey values: the CT presets in Hounsfield units, the `data.dicom_window` setting,
and DICOM's VOI functions (PS3.3 C.11.2.1.2-3) for values that are not DICOM (NIfTI volumes).

DICOM files are windowed by pydicom itself (`nvila_ft.data.dicom`); `apply_window` is the same function written
out for NIfTI, tested equal to pydicom's `apply_windowing`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Window presets (centre, width) in Hounsfield units, so for CT (whose modality LUT gives HU): the usual
# viewer settings as listed by Radiopaedia, "Windowing (CT)". "full" ignores the file's window: its whole range.
DICOM_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 400.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
}
DicomWindow = str | Sequence[float] | None


def check_dicom_window(window: DicomWindow) -> str | tuple[float, float] | None:
    """A window setting resolved: None (the file's own window, else its full range), "full", or (centre, width)
    for a preset name of `DICOM_WINDOWS` or a [centre, width] with width >= 1; ValueError otherwise."""
    if window is None or window == "full":
        return window
    if isinstance(window, str):
        if window not in DICOM_WINDOWS:
            raise ValueError(f"unknown DICOM window {window!r}; use one of {', '.join(DICOM_WINDOWS)}, full, "
                             "[centre, width] or null (the file's own window)")
        return DICOM_WINDOWS[window]
    try:
        centre, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"DICOM window {window!r}: give [centre, width], a preset name or null") from None
    if not (np.isfinite(centre) and np.isfinite(width) and width >= 1):
        raise ValueError(f"DICOM window {list(window)}: the width must be >= 1 (DICOM PS3.3 C.11.2.1.2)")
    return centre, width


def apply_window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Values windowed to 0..255 as DICOM PS3.3 C.11.2.1.2 / C.11.2.1.3 define it (output range 0..255).

    LINEAR (the default): x <= c - 0.5 - (w - 1) / 2 -> 0; x > c - 0.5 + (w - 1) / 2 -> 255; else
    ((x - (c - 0.5)) / (w - 1) + 0.5) * 255. LINEAR_EXACT: ((x - c) / w + 0.5) * 255, clipped.
    SIGMOID: 255 / (1 + exp(-4 (x - c) / w)).
    """
    if function == "SIGMOID":
        return 255.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip(((values - centre) / width + 0.5) * 255.0, 0.0, 255.0)
    if width <= 1:  # a one-value window is a threshold
        return np.where(values > centre - 0.5, 255.0, 0.0)
    return np.clip(((values - (centre - 0.5)) / (width - 1) + 0.5) * 255.0, 0.0, 255.0)


def map_range(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """[low, high] -> 0..255 linearly, clipped (all 0 when the range is empty); NaN counts as low."""
    values = np.asarray(values, dtype=np.float64)
    if not high > low:
        return np.zeros_like(values)
    return np.clip(np.nan_to_num((values - low) / (high - low) * 255.0, nan=0.0), 0.0, 255.0)


def stretch(values: np.ndarray) -> np.ndarray:
    """The full range of the finite `values` -> 0..255 (all 0 when they hold one value or none)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return np.zeros_like(values)
    return map_range(values, float(finite.min()), float(finite.max()))


def to_uint8(values: np.ndarray) -> np.ndarray:
    """0..255 floats rounded to the nearest grey level."""
    return np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8)
