"""Load the images and videos of a sample for the NVILA processor, refusing unsafe or broken media.

Sampling and colour conversion follow the official NVILA release: images are `.convert("RGB")`-ed,
videos are sampled at `round(linspace(0, count - 1, num_frames))`. Video files are decoded by
`nvila_ft.data.video_file`; DICOM files and series (`nvila_ft.data.dicom`) and NIfTI volumes (`nvila_ft.data.nifti`)
are recognised by their names or contents and read by their own modules; a multi-frame one given as an image
follows `nvila_ft.data.media_base`'s rule (one chosen frame).
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from nvila_ft.data import dicom, nifti
from nvila_ft.data.media_base import DEFAULT_OPTIONS, MediaError, MediaOptions, library_messages, sample_frame_indices
from nvila_ft.data.video_file import decode_chosen_frames, decode_sampled_frames

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


class EncodedImage(bytes):
    """Encoded image bytes that say where they came from (e.g. "column 'image'"), for the messages about them."""

    def __new__(cls, data: bytes, label: str = "<image bytes>") -> "EncodedImage":
        encoded = super().__new__(cls, data)
        encoded.label = label
        return encoded

    def __reduce__(self) -> tuple:
        return EncodedImage, (bytes(self), self.label)


# What Pillow's plugins raise on bad data, at open or at decode time.
_IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


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
    source: ImageSource, media_root: str | os.PathLike | None = None, options: MediaOptions = DEFAULT_OPTIONS
) -> Image.Image:
    """Return `source` (a path, encoded bytes or a PIL image) as a fully decoded RGB image.

    Images of more than 8 bits per pixel (16-bit or 32-bit grey PNG/TIFF, float TIFF, as medical and
    scientific images often are) are rescaled to 8 bits by their own range, or by `options.intensity_window`
    ([low, high] stored values -> 0..255), instead of being clipped. DICOM files are displayed by
    `options.dicom_window` (`nvila_ft.data.dicom`), NIfTI volumes show one slice (`nvila_ft.data.nifti`); a
    multi-frame DICOM, a folder of DICOM slices or a volume gives the frame `options.image_frame` names.
    `image.info["note"]` says how an image was converted when it is worth a line in the data report.
    """
    if isinstance(source, Image.Image):
        name, fp = "<PIL image>", None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, fp = getattr(source, "label", "<image bytes>"), io.BytesIO(source)
    else:
        fp = resolve_media_path(source, media_root)
        name = str(fp)
        medical = _medical_image(fp, media_root, options)
        if medical is not None:
            return medical
    try:
        with contextlib.nullcontext(source) if fp is None else Image.open(fp) as opened:
            # Decode now, so a truncated file fails here rather than somewhere in the processor.
            opened.load()
            if opened.mode in HIGH_BIT_DEPTH_MODES:
                image = _to_8_bits(opened, options.intensity_window)
            else:
                image = opened.convert("RGB")
    except Image.DecompressionBombError as e:
        raise MediaError(f"{name}: refused as a decompression bomb ({e})") from e
    except Image.UnidentifiedImageError as e:  # Pillow's message repeats the file (or a BytesIO's address)
        raise MediaError(f"{name}: cannot decode image (not in a format Pillow reads)") from e
    except _IMAGE_DECODE_ERRORS as e:
        raise MediaError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
    if image.width == 0 or image.height == 0:
        raise MediaError(f"{name}: image has zero size {image.size}")
    return image


def _medical_image(path: pathlib.Path, media_root: str | os.PathLike | None, options: MediaOptions) -> Image.Image | None:
    """A DICOM file, a DICOM series folder or a NIfTI volume as an image (with its note), or None for other files."""
    if path.is_dir():
        files = _frame_files(path, media_root)
        if not dicom.is_series(files):
            raise MediaError(f"{path}: a folder, not an image (a folder of DICOM slices is a series; a folder of "
                             "frames is a video)")
        with library_messages("pydicom", path):
            image, note = dicom.load_series_image(path, files, options)
    elif nifti.is_nifti(path):
        with library_messages("nibabel", path):
            image, note = nifti.load_image(path, options)
    elif dicom.is_dicom(path):
        with library_messages("pydicom", path):
            image, note = dicom.load_image(path, options)
    else:
        nifti.refuse_other_volume(path)
        if path.name.lower().endswith((".gz", ".bz2", ".xz", ".zip")):
            raise MediaError(f"{path}: a compressed file; decompress it (only NIfTI volumes are read compressed, "
                             ".nii.gz)", kind="unsupported_media")
        return None
    if note:
        image.info["note"] = note
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
    result.info["note"] = how
    return result


def image_size(
    source: ImageSource, media_root: str | os.PathLike | None = None, options: MediaOptions = DEFAULT_OPTIONS
) -> tuple[int, int]:
    """(width, height) of an image from its header (no pixel is decoded); DICOM from its Columns / Rows tags, a
    NIfTI volume from its shape (the slice across `options.volume_axis`), a DICOM series from one slice's header."""
    if isinstance(source, Image.Image):
        return source.size
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else resolve_media_path(source, media_root)
    if isinstance(fp, pathlib.Path):
        if fp.is_dir():
            files = _frame_files(fp, media_root)
            if not dicom.is_series(files):
                raise MediaError(f"{fp}: a folder, not an image")
            return dicom.image_size(dicom.series_files(fp, files)[0])
        if nifti.is_nifti(fp):
            return nifti.slice_size(fp, options)
        if dicom.is_dicom(fp):
            return dicom.image_size(fp)
    try:
        with Image.open(fp) as opened:
            return opened.size
    except Image.DecompressionBombError as e:
        raise MediaError(f"{fp}: refused as a decompression bomb ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise MediaError(f"{fp}: cannot decode image (not in a format Pillow reads)") from e
    except _IMAGE_DECODE_ERRORS as e:
        raise MediaError(f"{fp}: cannot decode image ({type(e).__name__}: {e})") from e


def volume_frames(
    source: VideoSource, media_root: str | os.PathLike | None = None, options: MediaOptions = DEFAULT_OPTIONS
) -> int | None:
    """From headers only: the frames of a video that is a DICOM file (its NumberOfFrames), a folder of DICOM
    slices (their count) or a NIfTI volume (its slices across `options.volume_axis`, within `volume_slices`), or
    None for any other video. Raises MediaError for a missing path or an unreadable header, as loading would."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = resolve_media_path(source, media_root)
    if path.is_dir():
        files = _frame_files(path, media_root)
        # frame-image folders are not opened here
        return len(dicom.series_files(path, files)) if dicom.is_series(files) else None
    if nifti.is_nifti(path):
        return nifti.header_frames(path, options)
    if dicom.is_dicom(path):
        return dicom.header_frames(path)
    return None


def _frame_files(path: pathlib.Path, media_root: str | os.PathLike | None) -> list[pathlib.Path]:
    """A folder's frames or slices: its non-hidden files in `sorted()` name order, each through the media-root
    check (a file may be a symlink pointing out)."""
    files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
    return [resolve_media_path(f, media_root) for f in files]


def load_video(
    source: VideoSource,
    num_frames: int,
    media_root: str | os.PathLike | None = None,
    options: MediaOptions = DEFAULT_OPTIONS,
) -> list[Image.Image]:
    """Return `num_frames` uniformly sampled RGB frames of a video file, a frame directory, a frame list or a
    `VideoClip` (its chosen frames, then sampled the same way).

    Frames come in temporal order, with repeats when the video has fewer frames than asked for. A
    directory's frames are its non-hidden files in plain `sorted()` name order, as in official NVILA
    (so `frame_10.png` comes before `frame_2.png`). A video file's frames are counted by decoding them,
    since containers often misreport their count; frames that fail to decode are skipped with a warning
    and not counted. A video file may still return fewer frames if a sampled frame cannot be converted to
    RGB, so callers check the length. Frames of more than 8 bits are rescaled as `load_image` does.
    Medical: a multi-frame DICOM file gives its own frames, a folder of DICOM slices is a series ordered
    anatomically (InstanceNumber, then position along the slice normal; not by file name), a NIfTI volume gives
    slices across `options.volume_axis`; all displayed by `options.dicom_window`, one window for all the frames.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("<frames list>: no frames")
        frames = []
        for index in sample_frame_indices(len(source), num_frames):
            try:
                frames.append(load_image(source[index], media_root, options))
            except MediaError as e:
                raise MediaError(f"<frames list> item {index}: {e}", kind=e.kind) from e
        return frames

    if isinstance(source, VideoClip):
        clip = _load_clip(source, media_root, options)
        return [clip[i] for i in sample_frame_indices(len(clip), num_frames)]
    path = resolve_media_path(source, media_root)
    if path.is_dir():
        files = _frame_files(path, media_root)
        if not files:
            raise MediaError(f"{source}: frame directory is empty")
        if dicom.is_series(files):
            with library_messages("pydicom", path):
                return dicom.load_series_video(path, files, num_frames, options)
        return [load_image(files[i], media_root, options) for i in sample_frame_indices(len(files), num_frames)]
    if nifti.is_nifti(path):
        with library_messages("nibabel", path):
            return nifti.load_video(path, num_frames, options)
    if dicom.is_dicom(path):
        with library_messages("pydicom", path):
            return dicom.load_video(path, num_frames, options)
    return decode_sampled_frames(path, num_frames)


def _load_clip(clip: VideoClip, media_root: str | os.PathLike | None, options: MediaOptions) -> list[Image.Image]:
    """The clip's frames, in its order; a video file is decoded only up to its last chosen frame."""
    if not clip.frames or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in clip.frames):
        raise ValueError(f"{clip}: frame indices must be a non-empty list of whole numbers >= 0")
    path = resolve_media_path(clip.source, media_root)
    last = max(clip.frames)
    if path.is_dir():
        files = _frame_files(path, None)  # only the chosen frames are opened, each through the media-root check
        if not files:
            raise MediaError(f"{clip.source}: frame directory is empty")
        if last >= len(files):
            raise MediaError(f"{clip}: frame {last} asked for, the folder has {len(files)} frames (0-{len(files) - 1})",
                             kind="video_frames")
        images = {i: load_image(files[i], media_root, options) for i in set(clip.frames)}
        return [images[i] for i in clip.frames]
    return decode_chosen_frames(path, clip.frames, str(clip))


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
