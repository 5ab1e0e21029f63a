"""The one box format of nvila-ft grounding tasks: how a box is written as text, read back, and compared.

A box is written `[x1, y1, x2, y2]`: the left, top, right and bottom edges, each a fraction of the ORIGINAL
image's width (x) or height (y) in [0, 1], with 2 decimals, origin at the top-left corner, x to the right,
y down ("[0.12, 0.40, 0.57, 0.93]"). Edges are pixel edges: a box over pixel columns 8..23 of a 64 px wide
image runs from x1 = 8/64 to x2 = 24/64. This is the box answer of NVILA/VILA's RefCOCO evaluation
(`llava/eval/refcoco.py`, box_format "standard": `[x1, y1, x2, y2]` times the image's width and height),
asked with the same question (`GROUNDING_PROMPT`). Coordinates are relative to the image as stored, before
any tiling: Dynamic-S2 and NVILA-Lite tiling stretch the whole image onto their grid without padding or
cropping, so a fraction of the original is the same fraction of what the model sees.

`parse_box` reads model output leniently (surrounding words, brackets or parentheses or none, commas or
spaces, integers or floats) and reports what is wrong instead of raising; `iou` compares two boxes;
`box_from_pixels` converts a pixel box ([x, y, w, h] as COCO/RefCOCO write it, or [x1, y1, x2, y2]) of an
image of known size into this format, raising `BoxError` for a box that is not a box of that image.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from nvila_ft.errors import UserError

Box = tuple[float, float, float, float]

DECIMALS = 2
# NVILA/VILA's RefCOCO question (`llava/eval/refcoco.py`); `{expression}` is the referring expression.
GROUNDING_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: {expression}."
PIXEL_FORMATS = ("xywh", "xyxy")

# The first bracketed group, or failing that the whole text, holds the numbers.
_BRACKETED = re.compile(r"[\[(]([^\[\]()]*)[\])]")
_SEPARATORS = re.compile(r"[,\s]+")


class BoxError(UserError, ValueError):
    """A box that is not a box of its image (the message says why)."""


class ParsedBox(NamedTuple):
    """What `parse_box` read: the box, or None and the problem with the text."""

    box: Box | None
    problem: str | None = None


def format_box(box: Box) -> str:
    """"[0.12, 0.40, 0.57, 0.93]": each coordinate rounded to 2 decimals and clamped to [0, 1]."""
    values = [min(max(float(v), 0.0), 1.0) for v in _four(box)]
    return "[" + ", ".join(f"{v:.{DECIMALS}f}" for v in values) + "]"


def parse_box(text: str) -> ParsedBox:
    """Read a box from model output; never raises.

    Takes the first group in brackets or parentheses, or the whole text when there is none, and expects four
    numbers in it separated by commas and/or spaces ("[0.1, 0.2, 0.5, 0.6]", "(0.1 0.2 0.5 0.6)",
    "The box is [0.1,0.2,0.5,0.6]."). Every number must lie in [0, 1], and x2 >= x1, y2 >= y1. A box of zero
    width or height is read (it overlaps nothing); anything else comes back as ParsedBox(None, problem).
    """
    if not isinstance(text, str):
        return ParsedBox(None, f"expected text, got {type(text).__name__}")
    match = _BRACKETED.search(text)
    inside = (match.group(1) if match else text).strip().rstrip(".")
    items = [item for item in _SEPARATORS.split(inside) if item]
    if not items or (match is None and not any(c.isdigit() for c in inside)):
        return ParsedBox(None, f"no box found in {_clip(text)!r}")
    if len(items) != 4:
        return ParsedBox(None, f"expected 4 numbers [x1, y1, x2, y2], got {len(items)} item(s) in {_clip(inside)!r}")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            return ParsedBox(None, f"{_clip(item)!r} is not a number")
        if not math.isfinite(value):
            return ParsedBox(None, f"{item!r} is not a finite number")
        values.append(value)
    try:
        return ParsedBox(check_box(tuple(values)))
    except BoxError as e:
        return ParsedBox(None, str(e))


def check_box(box: Box, allow_empty: bool = True) -> Box:
    """`box` as floats if it is a normalised box (coordinates in [0, 1], x2 >= x1, y2 >= y1), else BoxError.

    With allow_empty=False a box of zero width or height is refused too.
    """
    x1, y1, x2, y2 = (float(v) for v in _four(box))
    outside = [name for name, v in zip(("x1", "y1", "x2", "y2"), (x1, y1, x2, y2)) if not 0.0 <= v <= 1.0]
    if outside:
        raise BoxError(f"{', '.join(outside)} outside [0, 1] (coordinates are fractions of the image size): {list(box)}")
    if x2 < x1 or y2 < y1:
        raise BoxError(f"x2 < x1 or y2 < y1 (write [left, top, right, bottom]): {list(box)}")
    if not allow_empty and (x2 == x1 or y2 == y1):
        raise BoxError(f"zero area: {list(box)}")
    return x1, y1, x2, y2


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (continuous coordinates: boxes that only touch
    share nothing). 0 when the union has no area.

    Deliberately not VILA's `computeIoU` (llava/eval/refcoco.py), which takes pixel boxes with inclusive ends and
    adds 1 to every width and height: on fractions of the image there is no pixel to add, and both agree up to
    about one pixel per edge (boxes 0..10 and 1..11 px wide, 10 px high: 90/110 = 0.82 here, 110/132 = 0.83 there).
    """
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    overlap = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - overlap
    return overlap / union if union > 0 else 0.0


def box_from_pixels(bbox: object, width: int, height: int, bbox_format: str = "xywh") -> Box:
    """A pixel box of a `width` x `height` image -> a normalised [x1, y1, x2, y2] box.

    bbox_format "xywh": [x, y, w, h] (COCO, RefCOCO); "xyxy": [x1, y1, x2, y2]. Raises BoxError for a box
    that is not four numbers, has no area, or reaches outside the image (by more than half a pixel, which
    COCO's float annotations sometimes do; such boxes are clipped to the image).
    """
    if bbox_format not in PIXEL_FORMATS:
        raise ValueError(f"bbox_format must be one of {PIXEL_FORMATS}, got {bbox_format!r}")
    if not (width >= 1 and height >= 1):
        raise BoxError(f"the image is {width}x{height} pixels: no box can be measured on it")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise BoxError(f"expected 4 numbers [{', '.join(_names(bbox_format))}] in pixels, got {_clip(repr(bbox))}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
        raise BoxError(f"expected numbers, got {_clip(repr(list(bbox)))}")
    x, y, third, fourth = (float(v) for v in bbox)
    x2, y2 = (x + third, y + fourth) if bbox_format == "xywh" else (third, fourth)
    if x2 <= x or y2 <= y:
        what = "width or height <= 0" if bbox_format == "xywh" else "x2 <= x1 or y2 <= y1"
        raise BoxError(f"zero or negative area ({what}): {list(bbox)}")
    slack = 0.5
    if x < -slack or y < -slack or x2 > width + slack or y2 > height + slack:
        raise BoxError(f"{list(bbox)} ({bbox_format}) reaches outside the {width}x{height} image")
    x, x2 = max(x, 0.0), min(x2, float(width))
    y, y2 = max(y, 0.0), min(y2, float(height))
    return x / width, y / height, x2 / width, y2 / height


def _four(box: Box) -> tuple:
    if len(box) != 4:
        raise BoxError(f"a box has 4 coordinates [x1, y1, x2, y2], got {len(box)}")
    return tuple(box)


def _names(bbox_format: str) -> tuple[str, ...]:
    return ("x", "y", "w", "h") if bbox_format == "xywh" else ("x1", "y1", "x2", "y2")


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
