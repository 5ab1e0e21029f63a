"""What every media reader shares: the error it raises, the settings of how media are read (`data.*`), uniform
frame sampling, and the one rule for a multi-frame source met where an image is expected.

The rule: a multi-frame DICOM file, a folder of DICOM slices or a NIfTI volume given as an image gives one frame,
the one `image_frame` names ("middle", the default: frame count // 2; or a 0-based frame number), and the data
report counts it as a note; `image_frame="refuse"` refuses such records instead. Given as a video, the same
sources give `num_video_frames` evenly spaced frames. Every source (LLaVA JSON, tables, Hugging Face datasets, the
medical layouts) follows it, since they all load media through `nvila_ft.data.media`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import numpy as np

from nvila_ft.data.display_window import DicomWindow, check_dicom_window
from nvila_ft.errors import UserError

# Volume axes in canonical RAS+ orientation (NIfTI): the slices across each are the usual radiological views.
VOLUME_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


class MediaError(UserError, ValueError):
    """A media item could not be used; the message names the source and the reason, on one line.

    kind: what data validation reports: "missing_media", "unsafe_path", "corrupt_media", "video_frames" or
    "unsupported_media" (intact, but not usable as given here: a missing decoder package, a colour space or volume
    shape that is not read, a multi-frame source where `image_frame="refuse"`).
    """

    def __init__(self, message: str, kind: str = "corrupt_media") -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever a library's message held
        self.kind = kind


@dataclass(frozen=True)
class MediaOptions:
    """How media are read (the `data:` settings of the same names); a bad setting is a ValueError whose message
    starts with its name.

    intensity_window: [low, high] stored values of >8-bit grey PNG/TIFF mapped to 0..255 (None: each image's own
    range). dicom_window: how DICOM and NIfTI grey values are displayed: a preset of `DICOM_WINDOWS` (HU), [centre,
    width], "full" (the shown frames' range) or None (the file's own window: DICOM's VOI LUT or window, NIfTI's
    cal_min/cal_max; else the full range). image_frame: the frame of a multi-frame source given as an image
    ("middle", a 0-based number, or "refuse"). volume_axis: the NIfTI slices shown (axial, coronal or sagittal, in
    RAS+ orientation). volume_slices: [first, last] slice numbers of a NIfTI volume along that axis (both included)
    that frames are taken from (None: all).
    """

    intensity_window: tuple[float, float] | None = None
    dicom_window: DicomWindow = None
    image_frame: str | int = "middle"
    volume_axis: str = "axial"
    volume_slices: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        window = self.intensity_window
        if window is not None:
            if len(window) != 2 or not float(window[0]) < float(window[1]):
                raise ValueError(f"intensity_window = {list(window)}: give [low, high] with low < high, or null")
            object.__setattr__(self, "intensity_window", (float(window[0]), float(window[1])))
        try:
            check_dicom_window(self.dicom_window)
        except ValueError as err:
            raise ValueError(f"dicom_window: {err}") from None
        if not isinstance(self.dicom_window, (str, type(None))):
            object.__setattr__(self, "dicom_window", tuple(float(v) for v in self.dicom_window))
        frame = self.image_frame
        if isinstance(frame, bool) or not (frame in ("middle", "refuse") or (isinstance(frame, int) and frame >= 0)):
            raise ValueError(f"image_frame = {frame!r}: use middle, refuse or a frame number >= 0")
        if self.volume_axis not in VOLUME_AXES:
            raise ValueError(f"volume_axis = {self.volume_axis!r}: use one of {', '.join(VOLUME_AXES)}")
        slices = self.volume_slices
        if slices is not None:
            if (len(slices) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in slices)
                    or not 0 <= slices[0] <= slices[1]):
                raise ValueError(f"volume_slices = {list(slices)}: give [first, last] slice numbers, 0 <= first <= last, or null")
            object.__setattr__(self, "volume_slices", (int(slices[0]), int(slices[1])))


DEFAULT_OPTIONS = MediaOptions()


def image_frame_index(count: int, options: MediaOptions, source: object, what: str) -> tuple[int, str]:
    """(frame index, note for the data report) of a `count`-frame source given as an image, by `image_frame`;
    MediaError when refused or out of range. `what` names the source's kind ("multi-frame DICOM", ...)."""
    frame = options.image_frame
    if frame == "refuse":
        raise MediaError(f"{source}: a {what} of {count} frames given as an image; give it as a video, or set "
                         "data.image_frame=middle (or a frame number) to use one frame", kind="unsupported_media")
    if frame == "middle":
        return count // 2, f"{what} given as an image: its middle frame (data.image_frame)"
    if frame >= count:
        raise MediaError(f"{source}: data.image_frame={frame}, but the {what} has {count} frames (0-{count - 1})",
                         kind="unsupported_media")
    return frame, f"{what} given as an image: frame {frame} (data.image_frame)"


def sample_frame_indices(frame_count: int, num_frames: int) -> list[int]:
    """Uniformly spaced frame indices, as in official NVILA; repeats indices when frames are scarce."""
    if frame_count < 1:
        raise ValueError(f"frame_count must be >= 1, got {frame_count}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int).tolist()


@contextmanager
def library_messages(library: str, source: object) -> Iterator[None]:
    """Warnings a media library issues while reading `source` go to its logger (the run's log file, never the
    console, see nvila_ft.cli), prefixed with the file they are about, instead of to stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            log = logging.getLogger(library)
            for warning in caught:
                log.warning("%s: %s", source, " ".join(str(warning.message).split()))


def first_line(error: BaseException) -> str:
    """An exception as `Type: its first line` (libraries' messages often run over several lines)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].strip()}" if text else type(error).__name__

