"""Load the images and videos of a sample for the NVILA processor, refusing unsafe or broken media.

Sampling and colour conversion follow the official NVILA release: images are `.convert("RGB")`-ed,
videos are sampled at `round(linspace(0, count - 1, num_frames))`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # PyAV is imported lazily so that importing this module stays cheap.
    import av

logger = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes | Image.Image


@dataclass(frozen=True)
class VideoClip:
    """Chosen frames of a video file or frame folder: `frames` are 0-based indices in decoding order (a folder's
    files in `sorted()` name order), in the order the clip shows them. Only these frames are decoded."""

    source: str | os.PathLike
    frames: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.source} frames {list(self.frames)}"


VideoSource = str | os.PathLike | Sequence[ImageSource] | VideoClip

# What Pillow's plugins raise on bad data, at open or at decode time.
_IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

# Only plain files: no network, and no `concat:`/`subfile:` style protocols smuggled in through playlists.
_FFMPEG_OPTIONS = {"protocol_whitelist": "file"}


class MediaError(ValueError):
    """A media item could not be used; the message names the source and the reason.

    kind: "missing_media", "unsafe_path" or "corrupt_media" (what data validation reports).
    """

    def __init__(self, message: str, kind: str = "corrupt_media") -> None:
        super().__init__(message)
        self.kind = kind


def resolve_media_path(path: str | os.PathLike, media_root: str | os.PathLike | None) -> pathlib.Path:
    """Resolve `path` under `media_root` and refuse anything whose real path lies outside it.

    Relative paths are taken relative to `media_root`; absolute ones must lie inside it too. With
    `media_root=None` the path is used as given (the caller vouches for it).
    """
    resolved = pathlib.Path(path)
    if media_root is not None:
        root = pathlib.Path(media_root).resolve()
        # resolve() follows symlinks and collapses `..`, so the containment check sees the real target.
        resolved = (root / resolved).resolve()
        if not resolved.is_relative_to(root):
            raise MediaError(f"{path}: escapes the media root {root}", kind="unsafe_path")
    if not resolved.exists():
        under = f" under the media root {pathlib.Path(media_root).resolve()}" if media_root is not None else ""
        raise MediaError(f"{path}: not found (looked for {resolved.absolute()}{under})", kind="missing_media")
    return resolved


def load_image(
    source: ImageSource,
    media_root: str | os.PathLike | None = None,
    intensity_window: Sequence[float] | None = None,
    dicom_window: DicomWindow = None,
) -> Image.Image:
    """Return `source` (a path, encoded bytes or a PIL image) as a fully decoded RGB image.

    Images of more than 8 bits per pixel (16-bit or 32-bit grey PNG/TIFF, float TIFF, as medical and
    scientific images often are) are rescaled to 8 bits by their own range, or by `intensity_window`
    ([low, high] stored values -> 0..255), instead of being clipped; `image.info["rescaled"]` then says how.
    DICOM files are displayed by `dicom_window` (see `load_dicom`).
    """
    if isinstance(source, Image.Image):
        name, fp = "<PIL image>", None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = "<image bytes>", io.BytesIO(source)
    else:
        fp = resolve_media_path(source, media_root)
        name = str(fp)
        if is_dicom(fp):
            return load_dicom(fp, dicom_window)
    try:
        with contextlib.nullcontext(source) if fp is None else Image.open(fp) as opened:
            # Decode now, so a truncated file fails here rather than somewhere in the processor.
            opened.load()
            if opened.mode in HIGH_BIT_DEPTH_MODES:
                image = _to_8_bits(opened, intensity_window)
            else:
                image = opened.convert("RGB")
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: refused as a decompression bomb ({e})") from e
    except _IMAGE_DECODE_ERRORS as e:
        raise MediaError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    if image.width == 0 or image.height == 0:
        raise MediaError(f"{name}: image has zero size {image.size}")
    return image


# Pillow modes holding more than 8 bits per grey pixel; `convert("RGB")` would clip them at 255.
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8_bits(image: Image.Image, window: Sequence[float] | None) -> Image.Image:
    """A grey image of more than 8 bits as 8-bit RGB: `window` [low, high] or its own range maps to 0..255."""
    values = np.asarray(image, dtype=np.float64)
    if window is not None:
        low, high = (float(v) for v in window)
        how = f"high-bit-depth image rescaled to 8 bits by the window [{low:g}, {high:g}]"
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        how = "high-bit-depth image rescaled to 8 bits by its own range"
    scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    scaled = np.nan_to_num(np.clip(scaled, 0, 255))
    result = Image.fromarray(np.round(scaled).astype(np.uint8), "L").convert("RGB")
    result.info["rescaled"] = how
    return result


def image_size(source: ImageSource, media_root: str | os.PathLike | None = None) -> tuple[int, int]:
    """(width, height) of an image from its header (no pixel is decoded); DICOM from its Columns / Rows tags."""
    if isinstance(source, Image.Image):
        return source.size
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else resolve_media_path(source, media_root)
    if isinstance(fp, pathlib.Path) and is_dicom(fp):
        try:
            import pydicom

            header = pydicom.dcmread(str(fp), stop_before_pixels=True)
            return int(header.Columns), int(header.Rows)
        except Exception as e:  # noqa: BLE001 - an unreadable header is a corrupt file, whatever pydicom raises
            raise MediaError(f"{fp}: cannot read the DICOM header ({type(e).__name__}: {e})") from e
    try:
        with Image.open(fp) as opened:
            return opened.size
    except Image.DecompressionBombError as e:
        raise MediaError(f"{fp}: refused as a decompression bomb ({e})") from e
    except _IMAGE_DECODE_ERRORS as e:
        raise MediaError(f"{fp}: cannot decode image ({type(e).__name__}: {e})") from e


DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom(path: pathlib.Path) -> bool:
    """A DICOM file: `.dcm`/`.dicom`, or the "DICM" marker after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


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
    """A DICOM window setting as `load_dicom` takes it: None (the file's own window, else its full range),
    "full", a preset name of `DICOM_WINDOWS`, or [centre, width] with width >= 1; ValueError otherwise."""
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


def _first(value: object) -> float:
    """The first value of a possibly multi-valued DICOM number (WindowCenter "40\\400" -> 40)."""
    return float(value[0]) if isinstance(value, Sequence) and not isinstance(value, str) else float(value)


def _dicom_display(values: np.ndarray, dataset: object, window: DicomWindow, path: pathlib.Path) -> np.ndarray:
    """Modality-LUT output (one frame or a stack of frames) -> 0..255 grey: the configured window, else the
    file's VOI LUT or window (first of several), else the full range of `values`; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_voi_lut

    setting = check_dicom_window(window)
    if isinstance(setting, tuple):
        scaled = apply_window(values, *setting)
    elif setting is None and "VOILUTSequence" in dataset:
        lut = np.asarray(apply_voi_lut(values, dataset), dtype=np.float64)
        scaled = _stretch(lut)
    elif setting is None and dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None:
        try:
            centre, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
        except (TypeError, ValueError, IndexError) as e:
            raise MediaError(f"{path}: unreadable WindowCenter/WindowWidth ({e})") from e
        function = str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        scaled = apply_window(values, centre, width, function) if width > 0 else _stretch(values)
    else:
        scaled = _stretch(values)
    if str(dataset.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        scaled = 255.0 - scaled
    return np.round(scaled).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values, dtype=np.float64)


def _read_dicom(path: pathlib.Path, pixels: bool = True) -> object:
    try:
        import pydicom
    except ImportError as e:
        raise MediaError(f"{path}: reading DICOM needs pydicom (pip install 'nvila-ft[medical]')") from e
    try:
        dataset = pydicom.dcmread(str(path), stop_before_pixels=not pixels)
        if pixels:
            _check_dicom_pixel_count(dataset, path)
            dataset.pixel_array  # noqa: B018 - decode now, so that a broken file fails here
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for unreadable or compressed data
        what = "decode DICOM" if pixels else "read the DICOM header"
        raise MediaError(f"{path}: cannot {what} ({type(e).__name__}: {e})") from e
    return dataset


def _check_dicom_pixel_count(dataset: object, path: pathlib.Path) -> None:
    """Refuse a DICOM whose header declares a frame larger than Pillow refuses for any image (twice
    `Image.MAX_IMAGE_PIXELS`), before its (possibly compressed) pixel data is decoded into that much memory."""
    limit = Image.MAX_IMAGE_PIXELS
    rows, columns = int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0)
    if limit is not None and rows * columns > 2 * limit:
        raise MediaError(f"{path}: refused as a decompression bomb (the header declares {columns}x{rows} pixels a "
                         f"frame, over twice Pillow's limit of {limit} pixels)")


def _dicom_frames(dataset: object, path: pathlib.Path, indices: Sequence[int] | None, window: DicomWindow) -> list[Image.Image]:
    """Frames `indices` of one DICOM file (None: its middle frame) as RGB images, windowed together."""
    from pydicom.pixels import apply_modality_lut

    pixels = dataset.pixel_array
    count = int(dataset.get("NumberOfFrames", 1) or 1)
    stack = pixels if count > 1 else pixels[np.newaxis]
    chosen = stack[[count // 2] if indices is None else list(indices)]
    if chosen.size == 0:
        raise MediaError(f"{path}: DICOM image has zero size")
    if chosen.ndim == 4 and chosen.shape[-1] == 3:
        photometric = str(dataset.get("PhotometricInterpretation", "RGB"))
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            chosen = convert_color_space(chosen, photometric, "RGB")
        return [Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8), "RGB") for frame in chosen]
    values = np.asarray(apply_modality_lut(chosen, dataset), dtype=np.float64)
    grey = _dicom_display(values, dataset, window, path)
    return [Image.fromarray(frame, "L").convert("RGB") for frame in grey]


def load_dicom(path: pathlib.Path, window: DicomWindow = None) -> Image.Image:
    """A DICOM image (CT, MR, X-ray, ultrasound) as 8-bit RGB, displayed as a radiologist's viewer would.

    Stored values go through the modality LUT (rescale slope/intercept), then `window`: [centre, width] or a
    preset of `DICOM_WINDOWS` (by the linear function of PS3.3 C.11.2.1.2), "full" (the image's range), or
    None: the file's VOI LUT, else its WindowCenter/WindowWidth (the first when there are several; its
    VOILUTFunction), else the full range. MONOCHROME1 is inverted; colour images are kept. A multi-frame
    file gives its middle frame (as a video, `load_video` gives sampled frames).
    """
    return _dicom_frames(_read_dicom(path), path, None, window)[0]


def _series_files(path: pathlib.Path, files: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    """The slices of a folder series in anatomical order: by InstanceNumber, then by ImagePositionPatient
    projected on the slice normal (the cross product of ImageOrientationPatient's row and column), then name."""
    keyed = []
    series = set()
    for file in files:
        header = _read_dicom(file, pixels=False)
        series.add(str(header.get("SeriesInstanceUID", "")))
        number = header.get("InstanceNumber")
        position = header.get("ImagePositionPatient")
        orientation = header.get("ImageOrientationPatient")
        normal = np.cross(*np.reshape(np.asarray(orientation, dtype=float), (2, 3))) if orientation else np.array([0.0, 0.0, 1.0])
        along = float(np.dot(np.asarray(position, dtype=float), normal)) if position else 0.0
        keyed.append((float(number) if number not in (None, "") else float("inf"), along, file.name, file))
    if len(series) > 1:
        raise MediaError(f"{path}: holds {len(series)} DICOM series (SeriesInstanceUID); put each in its own folder")
    return [file for *_, file in sorted(keyed, key=lambda k: k[:3])]


def _load_dicom_series(path: pathlib.Path, files: Sequence[pathlib.Path], num_frames: int, window: DicomWindow) -> list[Image.Image]:
    """Sampled slices of a folder series (see `_series_files`), windowed together as one volume."""
    from pydicom.pixels import apply_modality_lut

    ordered = _series_files(path, files)
    chosen = [ordered[i] for i in sample_frame_indices(len(ordered), num_frames)]
    datasets = {file: _read_dicom(file) for file in dict.fromkeys(chosen)}
    arrays = [np.asarray(apply_modality_lut(datasets[f].pixel_array, datasets[f]), dtype=np.float64) for f in chosen]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 2:
        shapes = sorted({str(a.shape) for a in arrays})
        raise MediaError(f"{path}: a DICOM series needs single-frame grey slices of one size, got shapes {shapes}")
    grey = _dicom_display(np.stack(arrays), datasets[chosen[len(chosen) // 2]], window, path)
    return [Image.fromarray(frame, "L").convert("RGB") for frame in grey]


def dicom_video_frames(source: VideoSource, media_root: str | os.PathLike | None = None) -> int | None:
    """From headers only: the frames of a video that is a DICOM file (its NumberOfFrames) or a folder of
    DICOM slices (their count), or None for any other video. Raises MediaError for a missing path or an
    unreadable header, as loading would."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = resolve_media_path(source, media_root)
    if path.is_dir():
        # each file through the media-root check before it is opened: a slice may be a symlink pointing out
        files = [resolve_media_path(f, media_root) for f in _frame_files(path)]
        # a series when a file is named .dcm or the first file is DICOM; frame-image folders are not opened here
        if not files or not (any(f.suffix.lower() in DICOM_SUFFIXES for f in files) or is_dicom(files[0])):
            return None
        if not all(is_dicom(f) for f in files):
            raise MediaError(f"{source}: mixes DICOM slices with other files")
        return len(files)
    if is_dicom(path):
        return int(_read_dicom(path, pixels=False).get("NumberOfFrames", 1) or 1)
    return None


def _frame_files(path: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())


def sample_frame_indices(frame_count: int, num_frames: int) -> list[int]:
    """Uniformly spaced frame indices, as in official NVILA; repeats indices when frames are scarce."""
    if frame_count < 1:
        raise ValueError(f"frame_count must be >= 1, got {frame_count}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.round(np.linspace(0, frame_count - 1, num_frames)).astype(int).tolist()


def load_video(
    source: VideoSource,
    num_frames: int,
    media_root: str | os.PathLike | None = None,
    intensity_window: Sequence[float] | None = None,
    dicom_window: DicomWindow = None,
) -> list[Image.Image]:
    """Return `num_frames` uniformly sampled RGB frames of a video file, a frame directory, a frame list or a
    `VideoClip` (its chosen frames, then sampled the same way).

    Frames come in temporal order, with repeats when the video has fewer frames than asked for. A
    directory's frames are its non-hidden files in plain `sorted()` name order, as in official NVILA
    (so `frame_10.png` comes before `frame_2.png`). A video file's frames are counted by decoding them,
    since containers often misreport their count; frames that fail to decode are skipped with a warning
    and not counted. A video file may still return fewer frames if a sampled frame cannot be converted to
    RGB, so callers check the length. Frames of more than 8 bits are rescaled as `load_image` does.
    DICOM: a multi-frame file gives its own frames, and a folder of DICOM slices is a series ordered
    anatomically (InstanceNumber, then position along the slice normal; not by file name); both are
    displayed by `dicom_window` (see `load_dicom`), one window for all the sampled frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("<frames list>: no frames")
        frames = []
        for index in sample_frame_indices(len(source), num_frames):
            try:
                frames.append(load_image(source[index], media_root, intensity_window, dicom_window))
            except MediaError as e:
                raise MediaError(f"<frames list> item {index}: {e}") from e
        return frames

    if isinstance(source, VideoClip):
        clip = _load_clip(source, media_root, intensity_window, dicom_window)
        return [clip[i] for i in sample_frame_indices(len(clip), num_frames)]
    path = resolve_media_path(source, media_root)
    if path.is_dir():
        files = _frame_files(path)
        if not files:
            raise MediaError(f"{source}: frame directory is empty")
        # Each frame goes through the media-root check again: a frame may be a symlink pointing out.
        files = [resolve_media_path(f, media_root) for f in files]
        if dicom_video_frames(path, media_root):
            return _load_dicom_series(path, files, num_frames, dicom_window)
        return [load_image(files[i], media_root, intensity_window) for i in sample_frame_indices(len(files), num_frames)]
    if is_dicom(path):
        dataset = _read_dicom(path)
        count = int(dataset.get("NumberOfFrames", 1) or 1)
        return _dicom_frames(dataset, path, sample_frame_indices(count, num_frames), dicom_window)
    return _load_video_file(path, num_frames)


def _load_clip(
    clip: VideoClip, media_root: str | os.PathLike | None, intensity_window: Sequence[float] | None,
    dicom_window: DicomWindow = None,
) -> list[Image.Image]:
    """The clip's frames, in its order; a video file is decoded only up to its last chosen frame."""
    if not clip.frames or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in clip.frames):
        raise ValueError(f"{clip}: frame indices must be a non-empty list of whole numbers >= 0")
    path = resolve_media_path(clip.source, media_root)
    last = max(clip.frames)
    if path.is_dir():
        files = _frame_files(path)
        if not files:
            raise MediaError(f"{clip.source}: frame directory is empty")
        if last >= len(files):
            raise MediaError(f"{clip}: frame {last} asked for, the folder has {len(files)} frames (0-{len(files) - 1})",
                             kind="video_frames")
        images = {i: load_image(files[i], media_root, intensity_window, dicom_window) for i in set(clip.frames)}
        return [images[i] for i in clip.frames]
    import av

    wanted, images = set(clip.frames), {}
    with _open_video(path) as container:
        # Decoding is sequential (seeking lands on key frames, not exact indices): stop after the last one needed.
        decoded = 0
        for position, frame in enumerate(_decode_frames(container, path)):
            decoded = position + 1
            if position in wanted:
                try:
                    images[position] = frame.to_image().convert("RGB")
                except (av.FFmpegError, ValueError) as e:
                    raise MediaError(f"{clip}: frame {position} failed to convert ({e})") from e
            if position >= last:
                break
    if last not in images:
        raise MediaError(f"{clip}: frame {last} asked for, the video has {decoded} decodable frames (0-{decoded - 1})",
                         kind="video_frames")
    return [images[i] for i in clip.frames]


def _load_video_file(path: pathlib.Path, num_frames: int) -> list[Image.Image]:
    import av

    # Containers often misreport their frame count, so count what actually decodes first, then decode
    # again converting only the sampled frames: memory stays at num_frames images, whatever the length.
    with _open_video(path) as container:
        frame_count = sum(1 for _ in _decode_frames(container, path))
    if frame_count == 0:
        raise MediaError(f"{path}: no decodable video frames")
    indices = sample_frame_indices(frame_count, num_frames)

    wanted = set(indices)
    images: dict[int, Image.Image] = {}
    with _open_video(path) as container:
        # The counting pass already warned about any damage.
        for position, frame in enumerate(_decode_frames(container, path, warn=False)):
            if position in wanted:
                try:
                    images[position] = frame.to_image().convert("RGB")
                except (av.FFmpegError, ValueError) as e:
                    logger.warning("%s: skipped frame %d that failed to convert (%s)", path, position, e)
            if position >= indices[-1]:
                break
    if len(images) < len(wanted):
        logger.warning("%s: got %d of %d sampled frames", path, len(images), len(wanted))
    return [images[i] for i in indices if i in images]


def _open_video(path: pathlib.Path) -> av.container.InputContainer:
    import av

    try:
        # An absolute path cannot be mistaken for an FFmpeg protocol prefix such as `concat:`.
        container = av.open(str(path.absolute()), options=_FFMPEG_OPTIONS)
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"{path}: cannot open as a video ({e})") from e
    if not container.streams.video or container.streams.video[0].codec_context is None:
        container.close()
        raise MediaError(f"{path}: has no decodable video stream")
    return container


def _decode_frames(
    container: av.container.InputContainer, path: pathlib.Path, warn: bool = True
) -> Iterator[av.VideoFrame]:
    """Decode the first video stream, skipping packets that fail (as official NVILA skips bad frames)."""
    import av

    log = logger.warning if warn else logger.debug
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                log("%s: skipped a packet that failed to decode (%s)", path, e)
                continue
            yield from frames
    except av.FFmpegError as e:
        # The demuxer cannot go on (e.g. a truncated file): keep what decoded so far.
        log("%s: stopped reading at damaged data (%s)", path, e)


def write_video(
    frames: Sequence[Image.Image | np.ndarray], path: str | os.PathLike, fps: int = 8
) -> pathlib.Path:
    """Encode RGB frames as an H.264 mp4 at `path`, atomically; odd sizes are edge-padded to even."""
    import av

    if not frames:
        raise ValueError("write_video needs at least one frame")
    images = [f if isinstance(f, Image.Image) else Image.fromarray(f) for f in frames]
    arrays = [np.asarray(image.convert("RGB")) for image in images]
    height, width = arrays[0].shape[:2]
    if any(a.shape[:2] != (height, width) for a in arrays):
        raise ValueError("write_video needs all frames to have the same size")
    # yuv420p subsamples chroma 2x2, so libx264 refuses odd dimensions; padding keeps every pixel.
    pad = ((0, height % 2), (0, width % 2), (0, 0))

    path = pathlib.Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with av.open(tmp_name, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = width + width % 2, height + height % 2
            stream.pix_fmt = "yuv420p"
            for array in arrays:
                frame = av.VideoFrame.from_ndarray(np.pad(array, pad, mode="edge"), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise
    return path
