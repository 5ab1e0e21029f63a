"""DICOM files and folders of DICOM slices as 8-bit RGB frames, through pydicom's own pixel pipeline.

Decoding is pydicom's, with the decoder its transfer syntax needs: pydicom returns YBR_FULL / YBR_FULL_422 as RGB
and the JPEG 2000 decoder undoes YBR_ICT / YBR_RCT, so the colour space the decoder reports is the one used
(nothing is converted twice). Then, as a viewer displays it (PS3.3 C.11):
- grey (MONOCHROME1/2): pydicom's modality LUT (rescale slope/intercept or the Modality LUT Sequence), then its VOI
  (the configured window by `apply_windowing`, else the file's VOI LUT Sequence or window, the first of several),
  whose output range is mapped to 0..255; without a window the shown frames' full range is; MONOCHROME1 is inverted;
- PALETTE COLOR: pydicom's `apply_color_lut`, scaled from the table's bits to 8;
- RGB of more than 8 bits: scaled from BitsStored to 8 bits.
Enhanced multi-frame files take each frame's rescale and window from their shared and per-frame functional
groups. A file that cannot be read or decoded is refused on one line naming it (and, for a decoder that is not
installed, its transfer syntax and the package that decodes it). What pydicom logs goes to the run's log file.
"""

from __future__ import annotations

import copy
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from nvila_ft.data.display_window import check_dicom_window, map_range, stretch, to_uint8
from nvila_ft.data.media_base import (
    MediaError,
    MediaOptions,
    first_line,
    image_frame_index,
    library_messages,
    sample_frame_indices,
)

DICOM_SUFFIXES = (".dcm", ".dicom")
INSTALL_HINT = "pip install 'nvila-ft[medical]'"
# Functional-group macros that hold a frame's pixel-value transformation and window (PS3.3 C.7.6.16.2.9, .10).
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
# What the grey display reads from a file (or from a frame's functional groups).
_DISPLAY_KEYWORDS = (
    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "PixelRepresentation", "RescaleSlope",
    "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
    "VOILUTSequence",
    *(f"{colour}PaletteColorLookupTable{part}" for colour in ("Red", "Green", "Blue") for part in ("Descriptor", "Data")),
    *(f"Segmented{colour}PaletteColorLookupTableData" for colour in ("Red", "Green", "Blue")),
)

logging.getLogger("pydicom").addHandler(logging.NullHandler())  # outside the CLI, not Python's last-resort stderr


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


def _pydicom(path: object) -> Any:
    try:
        import pydicom
    except ImportError:
        raise MediaError(f"{path}: reading DICOM needs pydicom: {INSTALL_HINT}", kind="unsupported_media") from None
    return pydicom


def read_dicom(path: pathlib.Path, pixels: bool = True) -> Any:
    """The dataset of a DICOM file (pixel data read but not decoded unless asked for); MediaError naming the file
    when it is not DICOM, holds no image, or declares a frame over twice Pillow's decompression-bomb limit."""
    pydicom = _pydicom(path)
    try:
        with library_messages("pydicom", path):
            dataset = pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except pydicom.errors.InvalidDicomError as e:
        raise MediaError(f"{path}: not a DICOM file nvila-ft reads (no 'DICM' preamble with file meta information; "
                         "a raw dataset needs its transfer syntax written into file meta)") from e
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for files it cannot parse
        raise MediaError(f"{path}: cannot read the DICOM file ({first_line(e)})") from e
    if pixels and not any(key in dataset for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = _sop_class(dataset)
        if "Image Storage" in sop:  # an image whose file ends before its pixels
            raise MediaError(f"{path}: holds no pixel data although it is a {sop} file (cut short?)")
        raise MediaError(f"{path}: a DICOM file without an image (no pixel data; SOP class {sop})",
                         kind="unsupported_media")
    limit = Image.MAX_IMAGE_PIXELS
    rows, columns = _whole(dataset, "Rows", path), _whole(dataset, "Columns", path)
    if limit is not None and rows * columns > 2 * limit:
        raise MediaError(f"{path}: refused as a decompression bomb (the header declares {columns}x{rows} pixels a "
                         f"frame, over twice Pillow's limit of {limit} pixels)")
    return dataset


def _sop_class(dataset: Any) -> str:
    meta = getattr(dataset, "file_meta", None)
    uid = dataset.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return getattr(uid, "name", None) or str(uid or "unknown")


def _whole(dataset: Any, keyword: str, path: object, default: int = 0) -> int:
    value = dataset.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise MediaError(f"{path}: DICOM {keyword} {value!r} is not a whole number") from None


def frame_count(dataset: Any, path: object) -> int:
    return max(1, _whole(dataset, "NumberOfFrames", path, default=1))


def header_frames(path: pathlib.Path) -> int:
    """The frames of a DICOM file, from its header alone."""
    return frame_count(read_dicom(path, pixels=False), path)


def image_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) of a DICOM file's frames, from its header."""
    header = read_dicom(path, pixels=False)
    return _whole(header, "Columns", path), _whole(header, "Rows", path)


# ------------------------------------------------------------------------------------------------- decoding
def _decoder(dataset: Any, path: object) -> Any:
    """pydicom's decoder of the file's transfer syntax, refusing (one line) one that is missing or not installed."""
    from pydicom.pixels import get_decoder

    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    if syntax is None:
        raise MediaError(f"{path}: the DICOM file meta gives no transfer syntax, so its pixel data cannot be decoded")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise MediaError(f"{path}: pydicom has no decoder for its transfer syntax {_syntax(syntax)}",
                         kind="unsupported_media") from None
    if not decoder.is_available:
        raise MediaError(f"{path}: its transfer syntax {_syntax(syntax)} needs a decoder that is not installed: "
                         f"{_packages(decoder)} ({INSTALL_HINT})", kind="unsupported_media")
    return decoder


def _syntax(uid: Any) -> str:
    name = getattr(uid, "name", "")
    return f"{name} ({uid})" if name and name != str(uid) else str(uid)


def _packages(decoder: Any) -> str:
    """The packages that would decode, from pydicom's "plugin - requires a and b" notes."""
    needs = [note.split(" - requires ", 1)[-1] for note in decoder.missing_dependencies]
    return " or ".join(needs) or "a pydicom decoder plugin"


def decode_frames(dataset: Any, path: object, indices: Sequence[int]) -> tuple[list[np.ndarray], str, int]:
    """Frames `indices` of a file as pydicom decodes them (colour as RGB where pydicom converts it), with the
    photometric interpretation and bits stored of the returned arrays."""
    decoder = _decoder(dataset, path)
    wanted = sorted(set(indices))
    decoded: dict[int, np.ndarray] = {}
    meta: dict[str, Any] = {}
    try:
        with library_messages("pydicom", path):
            for index, (array, meta) in zip(wanted, decoder.iter_array(dataset, indices=wanted, as_rgb=True)):
                decoded[index] = array
    except Exception as e:  # noqa: BLE001 - every decoder plugin raises its own types
        syntax = _syntax(dataset.file_meta.TransferSyntaxUID)
        more = f" (not installed, may decode it: {_packages(decoder)})" if decoder.missing_dependencies else ""
        raise MediaError(f"{path}: cannot decode its {syntax} pixel data: {_plugin_errors(e)}{more}") from e
    photometric = str(meta.get("photometric_interpretation", dataset.get("PhotometricInterpretation", "")))
    bits = int(meta.get("bits_stored", dataset.get("BitsStored", 8)) or 8)
    return [decoded[i] for i in indices], photometric, bits


def _plugin_errors(error: BaseException) -> str:
    """pydicom's "raised by all available plugins:\\n  name: reason" message on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith("plugins:"):
        return "; ".join(lines[1:])
    return first_line(error)


# ------------------------------------------------------------------------------------------------- display
def frame_header(dataset: Any, index: int) -> Any:
    """What displays frame `index`: the file's display attributes, overridden by its shared functional groups and
    then by the frame's own (enhanced multi-frame files keep rescale and window there)."""
    from pydicom.dataset import Dataset

    header = Dataset()
    for keyword in _DISPLAY_KEYWORDS:
        if keyword in dataset:
            header[keyword] = dataset[keyword]
    if hasattr(dataset, "file_meta"):
        header.file_meta = dataset.file_meta  # the byte order of OW lookup tables
    groups = [dataset.get("SharedFunctionalGroupsSequence"), dataset.get("PerFrameFunctionalGroupsSequence")]
    items = [groups[0][0] if groups[0] else None, groups[1][index] if groups[1] and index < len(groups[1]) else None]
    for item in items:
        for macro in _FRAME_MACROS:
            if item is not None and item.get(macro):
                for element in item.get(macro)[0]:
                    header[element.tag] = element
    return header


def _voi(values: np.ndarray, header: Any, setting: Any, path: object) -> np.ndarray | None:
    """Modality values through the VOI (0..255 floats), or None when there is no window: a full-range display."""
    from pydicom.pixels import apply_voi

    if setting == "full":
        return None
    if isinstance(setting, tuple):
        header = copy.copy(header)
        header.WindowCenter, header.WindowWidth, header.VOILUTFunction = setting[0], setting[1], "LINEAR"
        return _windowed(values, header, path)
    lut = header.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        integral = values if np.issubdtype(values.dtype, np.integer) else np.round(values).astype(np.int64)
        bits = int(lut[0].LUTDescriptor[2])
        # pydicom 3.0 keeps the table indices in the entries' type: with 8-bit entries an index past 255 wraps
        # around. Entries are 16-bit words in the file whatever their bits, so they are read as 16-bit here.
        wide = copy.deepcopy(header)
        wide.VOILUTSequence[0].LUTDescriptor = [*lut[0].LUTDescriptor[:2], 16]
        return map_range(apply_voi(integral, wide), 0, 2**bits - 1)
    if header.get("WindowCenter") is not None and header.get("WindowWidth") is not None:
        try:
            return _windowed(values, header, path)
        except ValueError as e:  # a width < 1: the file's window cannot be applied, so its full range is shown
            logging.getLogger("pydicom").warning("%s: window not applied (%s); full range shown", path, e)
            return None
    return None


def _windowed(values: np.ndarray, header: Any, path: object) -> np.ndarray:
    """pydicom's `apply_windowing`, whose output spans the modality output range [y_min, y_max], mapped to 0..255.
    The range is pydicom's own: the outputs of values far below and far above any window."""
    from pydicom.pixels import apply_windowing

    with library_messages("pydicom", path), np.errstate(over="ignore"):
        low, high = apply_windowing(np.array([-1e300, 1e300]), copy.copy(header))
        out = apply_windowing(np.asarray(values, dtype=np.float64), copy.copy(header))
    return map_range(out, float(low), float(high))


def render_frames(
    frames: Sequence[np.ndarray], headers: Sequence[Any], photometric: str, bits: int, options: MediaOptions,
    path: object,
) -> list[Image.Image]:
    """Decoded frames (with each frame's display header) as 8-bit RGB images; grey frames without a window share
    one full-range display."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        setting = check_dicom_window(options.dicom_window)
        with library_messages("pydicom", path):
            values = [apply_modality_lut(frame, header) for frame, header in zip(frames, headers)]
        shown = [_voi(v, header, setting, path) for v, header in zip(values, headers)]
        if any(s is None for s in shown):  # the full range of every shown frame together
            shown = list(stretch(np.stack([np.asarray(v, dtype=np.float64) for v in values])))
        grey = [to_uint8(255.0 - s if photometric == "MONOCHROME1" else s) for s in shown]
        return [Image.fromarray(g, "L").convert("RGB") for g in grey]
    if photometric == "PALETTE COLOR":
        try:
            with library_messages("pydicom", path):
                table_bits = int(headers[0].get("RedPaletteColorLookupTableDescriptor", [0, 0, 8])[2])
                colour = [apply_color_lut(frame, headers[0]) for frame in frames]
        except Exception as e:  # noqa: BLE001 - a malformed palette is a corrupt file
            raise MediaError(f"{path}: cannot apply its palette ({first_line(e)})") from e
        return [Image.fromarray(to_uint8(map_range(c, 0, 2**table_bits - 1)), "RGB") for c in colour]
    if photometric in ("YBR_FULL", "YBR_FULL_422"):  # left as stored by the decoder (e.g. as_rgb not applied)
        frames = [convert_color_space(frame, photometric, "RGB") for frame in frames]
        photometric = "RGB"
    if photometric != "RGB" or any(frame.ndim != 3 or frame.shape[-1] != 3 for frame in frames):
        raise MediaError(f"{path}: DICOM colour space {photometric!r} is not read (use MONOCHROME1/2, PALETTE COLOR, "
                         "RGB or YBR_FULL/YBR_FULL_422/YBR_ICT/YBR_RCT)", kind="unsupported_media")
    if bits <= 8:
        return [Image.fromarray(np.asarray(frame, dtype=np.uint8), "RGB") for frame in frames]
    return [Image.fromarray(to_uint8(map_range(frame, 0, 2**bits - 1)), "RGB") for frame in frames]


def load_frames(path: pathlib.Path, indices: Sequence[int] | None, options: MediaOptions, dataset: Any = None) -> list[Image.Image]:
    """Frames `indices` of a DICOM file (None: all) as 8-bit RGB images."""
    dataset = read_dicom(path) if dataset is None else dataset
    count = frame_count(dataset, path)
    indices = list(range(count)) if indices is None else list(indices)
    if any(not 0 <= i < count for i in indices):
        raise MediaError(f"{path}: frames {indices} asked for, the file has {count} (0-{count - 1})", kind="video_frames")
    frames, photometric, bits = decode_frames(dataset, path, indices)
    if any(frame.size == 0 for frame in frames):
        raise MediaError(f"{path}: DICOM image has zero size")
    headers = {i: frame_header(dataset, i) for i in set(indices)}
    return render_frames(frames, [headers[i] for i in indices], photometric, bits, options, path)


def load_image(path: pathlib.Path, options: MediaOptions) -> tuple[Image.Image, str | None]:
    """A DICOM file as an image, and a note when it is multi-frame (one frame, by `options.image_frame`)."""
    dataset = read_dicom(path)
    count = frame_count(dataset, path)
    if count == 1:
        return load_frames(path, [0], options, dataset)[0], None
    index, note = image_frame_index(count, options, path, "multi-frame DICOM")
    return load_frames(path, [index], options, dataset)[0], note


def load_video(path: pathlib.Path, num_frames: int, options: MediaOptions) -> list[Image.Image]:
    """`num_frames` evenly spaced frames of a (multi-frame) DICOM file, displayed together."""
    dataset = read_dicom(path)
    return load_frames(path, sample_frame_indices(frame_count(dataset, path), num_frames), options, dataset)


# ------------------------------------------------------------------------------------------------- series
def is_series(files: Sequence[pathlib.Path]) -> bool:
    """Whether a folder's files are a DICOM series: a file is named .dcm, or the first file is DICOM."""
    return bool(files) and (any(f.suffix.lower() in DICOM_SUFFIXES for f in files) or is_dicom(files[0]))


def series_files(folder: os.PathLike, files: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    """The slices of a folder series in anatomical order: by InstanceNumber, then by ImagePositionPatient
    projected on the slice normal (the cross product of ImageOrientationPatient's row and column), then name."""
    if not all(is_dicom(f) for f in files):
        raise MediaError(f"{folder}: mixes DICOM slices with other files")
    keyed, series = [], set()
    for file in files:
        header = read_dicom(file, pixels=False)
        series.add(str(header.get("SeriesInstanceUID", "")))
        number, position, orientation = (header.get(k) for k in ("InstanceNumber", "ImagePositionPatient",
                                                                    "ImageOrientationPatient"))
        try:
            normal = np.cross(*np.reshape(np.asarray(orientation, dtype=float), (2, 3))) if orientation else np.array([0.0, 0.0, 1.0])
            along = float(np.dot(np.asarray(position, dtype=float), normal)) if position else 0.0
            order = float(number) if number not in (None, "") else float("inf")
        except (TypeError, ValueError) as e:
            raise MediaError(f"{file}: unreadable InstanceNumber / ImagePositionPatient / ImageOrientationPatient ({e})") from e
        keyed.append((order, along, file.name, file))
    if len(series) > 1:
        raise MediaError(f"{folder}: holds {len(series)} DICOM series (SeriesInstanceUID); put each in its own folder")
    return [file for *_, file in sorted(keyed, key=lambda k: k[:3])]


def load_series(folder: os.PathLike, files: Sequence[pathlib.Path], indices: Sequence[int], options: MediaOptions) -> list[Image.Image]:
    """Slices `indices` (in anatomical order) of a folder series, displayed together with the window of the
    middle chosen slice when the window is the files' own."""
    ordered = series_files(folder, files)
    chosen = [ordered[i] for i in indices]
    datasets = {file: read_dicom(file) for file in dict.fromkeys(chosen)}
    decoded = {}
    for file, dataset in datasets.items():
        if frame_count(dataset, file) != 1:
            raise MediaError(f"{folder}: a DICOM series needs single-frame slices; {file.name} has "
                             f"{frame_count(dataset, file)} frames")
        decoded[file] = decode_frames(dataset, file, [0])
    kinds = {(photometric, frames[0].shape) for frames, photometric, _ in decoded.values()}
    if len(kinds) != 1 or next(iter(kinds))[0] not in ("MONOCHROME1", "MONOCHROME2"):
        raise MediaError(f"{folder}: a DICOM series needs grey slices of one size, got "
                         f"{sorted(f'{p} {s}' for p, s in kinds)}")
    reference = frame_header(datasets[chosen[len(chosen) // 2]], 0)
    window = {k: reference[k] for k in ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence") if k in reference}
    headers = []
    for file in chosen:
        header = frame_header(datasets[file], 0)
        for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"):
            if keyword in header:
                del header[keyword]
        for element in window.values():
            header[element.tag] = element
        headers.append(header)
    photometric = next(iter(kinds))[0]
    return render_frames([decoded[f][0][0] for f in chosen], headers, photometric, decoded[chosen[0]][2], options, folder)


def load_series_image(folder: os.PathLike, files: Sequence[pathlib.Path], options: MediaOptions) -> tuple[Image.Image, str]:
    """One slice of a folder series given as an image (by `options.image_frame`), and the note saying so."""
    index, note = image_frame_index(len(files), options, folder, "DICOM series")
    return load_series(folder, files, [index], options)[0], note


def load_series_video(folder: os.PathLike, files: Sequence[pathlib.Path], num_frames: int, options: MediaOptions) -> list[Image.Image]:
    return load_series(folder, files, sample_frame_indices(len(files), num_frames), options)
