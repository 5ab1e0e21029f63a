"""Referring-expression grounding data: an expression about an image -> the box of what it refers to.

Answers are boxes in the one format of `nvila_ft.domains.grounding.boxes` ("[x1, y1, x2, y2]", fractions of the image).
`GroundingData` reads, by `layout`:

- "refcoco": RefCOCO-style JSON (a list) or JSON Lines, one object per record:
      {"image": "coco/000000123.jpg", "expression": "the man on the left" | "sentences": [...],
       "bbox": [x, y, w, h], "id": ...}
  `bbox` is in PIXELS of the image, [x, y, w, h] as COCO/RefCOCO write it (bbox_format "xywh") or
  [x1, y1, x2, y2] (bbox_format "xyxy"); it is converted with the image's size read from its header
  (`nvila_ft.data.media.image_size`; optional "width"/"height" fields must agree with it). "sentences" is a
  list of strings or of {"sent": ...} / {"raw": ...} objects (RefCOCO's refs); each expression becomes one
  record. The question is `question_template` with the expression filled in (NVILA's RefCOCO question).
- "llava": LLaVA/NVILA JSON whose last answer is a box in the documented format; the record is kept as written.

With `path: null` the built-in synthetic set (`nvila_ft.domains.grounding.generator.make_grounding_dataset`, options in
`synthetic`) is read through the "llava" layout. A record with a bad box (outside the image, zero area, not four
numbers), a missing expression or an unreadable image is reported with the file, the record's 0-based index
and the field, like every other source (`on_error`: "collect" keeps the good records).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvila_ft.data.kit import (
    RecordProblem,
    SubsetFile,
    WrittenSubset,
    check_on_error,
    describe_value,
    json_file_records,
    optional_id,
    question_answer,
    report,
    resolve_media_root,
)
from nvila_ft.data.llava import LlavaJson
from nvila_ft.data.media import MediaError, image_size
from nvila_ft.data.records import Record
from nvila_ft.data.subset import cannot_write, file_of, write_entries
from nvila_ft.data.validation import BadRecord
from nvila_ft.domains.grounding.boxes import GROUNDING_PROMPT, PIXEL_FORMATS, BoxError, box_from_pixels, format_box, parse_box
from nvila_ft.domains.grounding.generator import make_grounding_dataset
from nvila_ft.domains.synthetic import builtin_folder

LAYOUTS = ("refcoco", "llava")
QUESTION_TYPE = "ground"  # as the built-in set's, so per-type scores and the question-prior baseline group them


class GroundingData:
    """Referring expressions with box answers (see the module docstring for the layouts)."""

    def __init__(
        self,
        path: str | None = None,
        layout: str = "refcoco",
        bbox_format: str = "xywh",
        media_root: str | None = None,
        question_template: str = GROUNDING_PROMPT,
        synthetic: dict[str, Any] | None = None,
        limit: int | None = None,
        on_error: str = "collect",
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if bbox_format not in PIXEL_FORMATS:
            raise ValueError(f"bbox_format must be one of {PIXEL_FORMATS} (the pixel box of the refcoco layout), got {bbox_format!r}")
        if "{expression}" not in question_template:
            raise ValueError(f"question_template must contain {{expression}}, got {question_template!r}")
        self.path = None if path is None else str(path)
        self.layout, self.bbox_format, self.media_root = layout, bbox_format, media_root
        self.question_template, self.synthetic, self.limit = question_template, dict(synthetic or {}), limit
        self.on_error = check_on_error(on_error)
        self.errors: list[BadRecord] = []  # malformed records of the last records() call (on_error="collect")

    def records(self) -> list[Record]:
        self.errors = []
        if self.path is None:
            return self._llava_records(str(self.synthetic_file()))
        if self.layout == "llava":
            return self._llava_records(self.path)
        return self._refcoco_records()

    def synthetic_file(self) -> Path:
        """The built-in set (`synthetic`: num_records, seed, cache_dir and the generator's options), generated on
        first use into the cache folder BuiltinData("grounding", ...) uses."""
        options = dict(self.synthetic)
        num_records, seed, cache_dir = options.pop("num_records", 1000), options.pop("seed", 0), options.pop("cache_dir", None)
        return make_grounding_dataset(builtin_folder("grounding", num_records, seed, options, cache_dir), num_records,
                                      seed=seed, **options)

    # -- subsets
    def subset_files(self) -> list[SubsetFile]:
        if self.path is None:
            raise cannot_write(self)
        return file_of(self, self.path, self.media_root)

    def write_subset(self, file: SubsetFile, indices: set[int], out: Path) -> WrittenSubset:
        return write_entries(file, indices, out)

    # -- LLaVA JSON with box answers
    def _llava_records(self, path: str) -> list[Record]:
        source = LlavaJson(path, self.media_root, self.limit, on_error=self.on_error)
        out = []
        for record in source.records():
            parsed = parse_box(record.answer or "")
            problem = parsed.problem or _unwritable(parsed.box)
            if problem is None:
                out.append(Record(record.messages, record.origin, record.id, record.media_root,
                                  {**record.meta, "question_type": record.meta.get("question_type", QUESTION_TYPE)}))
            else:
                report(self, record.origin, RecordProblem(f"field 'conversations' (the last gpt value): not a box: {problem}"))
        self.errors = list(source.errors) + self.errors
        return out

    # -- RefCOCO-style records
    def _refcoco_records(self) -> list[Record]:
        root = resolve_media_root(self.media_root, Path(self.path).parent)
        return json_file_records(self, Path(self.path), self.path, lambda entry, origin, index: self._refcoco_record(entry, origin, index, root))

    def _refcoco_record(self, entry: Any, origin: str, index: int, root: str) -> list[Record]:
        if not isinstance(entry, dict):
            raise RecordProblem(f"expected an object with 'image', 'expression' or 'sentences', and 'bbox'; got {describe_value(entry)}")
        image = entry.get("image")
        if not isinstance(image, str) or not image.strip():
            raise RecordProblem(f"field 'image': expected an image path, got {describe_value(image)}")
        expressions = _expressions(entry)
        if "bbox" not in entry:
            raise RecordProblem("field 'bbox': missing (the box in pixels, [x, y, w, h] or [x1, y1, x2, y2] by bbox_format)")
        try:
            width, height = image_size(image, root)
        except MediaError as e:
            raise RecordProblem(f"field 'image': {e}", kind=e.kind) from e
        for field, actual in (("width", width), ("height", height)):
            stated = entry.get(field)
            if stated is not None and stated != actual:
                raise RecordProblem(f"field {field!r}: {stated!r}, but the image is {width}x{height} (boxes are in the image's pixels)")
        try:
            box = box_from_pixels(entry["bbox"], width, height, self.bbox_format)
        except BoxError as e:
            raise RecordProblem(f"field 'bbox': {e}") from e
        answer = format_box(box)
        problem = _unwritable(parse_box(answer).box)
        if problem:
            raise RecordProblem(f"field 'bbox': {problem}")
        base_id = optional_id(entry.get("id", entry.get("ref_id")))
        records = []
        for k, expression in enumerate(expressions):
            record_id = base_id if len(expressions) == 1 else f"{base_id if base_id is not None else index}#{k}"
            question = self.question_template.replace("{expression}", expression)
            records.append(Record(question_answer([image], [], question, answer), origin, record_id, root,
                                  {"question_type": QUESTION_TYPE, "image_size": [width, height]}))
        return records


def _expressions(entry: dict[str, Any]) -> list[str]:
    """The record's referring expressions: "expression" (a string) or "sentences" (strings or {"sent"/"raw"})."""
    if "expression" in entry:
        value = entry["expression"]
        if not isinstance(value, str) or not value.strip():
            raise RecordProblem(f"field 'expression': expected a non-empty string, got {describe_value(value)}")
        return [value.strip()]
    value = entry.get("sentences")
    if value is None:
        raise RecordProblem("has neither 'expression' nor 'sentences' (the referring expression)")
    items = value if isinstance(value, list) else [value]
    out = []
    for k, item in enumerate(items):
        text = item.get("sent", item.get("raw")) if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise RecordProblem(f"field 'sentences[{k}]': expected a string or {{'sent': ...}}, got {describe_value(item)}")
        out.append(text.strip())
    if not out:
        raise RecordProblem("field 'sentences': empty list")
    return out


def _unwritable(box: Any) -> str | None:
    """Why a box cannot be an answer although it parses: no area once written with 2 decimals."""
    if box is not None and (box[2] <= box[0] or box[3] <= box[1]):
        return f"zero area once written as {format_box(box)} (a box under a hundredth of the image wide or high can round to one edge)"
    return None
