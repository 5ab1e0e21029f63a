"""Medical VQA datasets in their own published layouts: VQA-RAD, SLAKE, PathVQA and PMC-VQA.

Each record gets `meta["question_type"]` = its answer type ("closed", "open" or "choice"), which the medical
metrics (`closed_accuracy`, `open_recall`, ... in nvila_ft/domains/medical/metrics.py) split their scores by, plus the
dataset's own descriptors (organ, modality, location, ...) and its question id as the record id.

Layouts (field names as the releases spell them):
- vqa_rad: the official `VQA_RAD Dataset Public.json`, a list of {qid, image_name, question, answer,
  answer_type (CLOSED/OPEN), question_type, phrase_type, image_organ}; images in `VQA_RAD Image Folder/`
  beside it (the default media root when it exists). `split`: "train" or "test" keeps the official split
  (test questions have a phrase_type starting with "test"), null keeps all. The Hugging Face copy
  (parquet/arrow files or a folder of them; JSON(L) with image, question, answer) is read too.
- slake: SLAKE's `train.json` / `validate.json` / `test.json`, a list of {qid, img_id, img_name
  ("xmlab102/source.jpg"), question, answer, answer_type (OPEN/CLOSED), q_lang (en/zh), location, modality,
  base_type, content_type}; images under `imgs/` beside it (the default media root when it exists).
  `language` keeps one q_lang (default "en"; null keeps all).
- pathvqa: the widely used Hugging Face layout (parquet/arrow, or JSON(L)) of {image (bytes, a
  {"bytes", "path"} dict or a relative path), question, answer}; an answer that is exactly "yes" or "no" is
  closed, any other open (PathVQA's own split, as NVlabs/VILA llava/eval/pathvqa.py scores it: "positive" or
  "absent" answer open questions there, so they are scored by recall, not as yes/no synonyms).
  The original release's pickles are refused: loading a pickle can run arbitrary code.
- pmc_vqa: PMC-VQA's CSV {Figure_path, Question, Answer, Choice A..Choice D, Answer_label}; images in
  `figures/` beside it (the default media root when it exists). The prompt is the question followed by one
  line per option, "A. <text>" ... "D. <text>" (a "A:" prefix the release writes in its option cells is
  dropped); the answer is the letter ("B"). meta["choices"] = {"A": text, ...} lets `choice_accuracy` also
  accept the option's text.

In vqa_rad and slake a record's extra `video` field (a multi-frame DICOM, a folder of DICOM slices, a NIfTI
volume or a video file) becomes the record's video; a multi-frame source in the image field gives one frame, as in
every source (`nvila_ft.data.media_base`: data.image_frame).
Malformed records are reported like the other sources' (file, 0-based index, field; `on_error`).
"""

from __future__ import annotations

import glob
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nvila_ft.data.hf_dataset import HFDataset, MissingImageColumn
from nvila_ft.data.kit import (
    PICKLE_SUFFIXES,
    DataError,
    RecordProblem,
    SubsetFile,
    WrittenSubset,
    check_on_error,
    describe_value,
    json_entries,
    question_answer,
    report,
    resolve_media_root,
    table_delimiter,
    table_rows,
)
from nvila_ft.data.records import Record
from nvila_ft.data.subset import write_entries
from nvila_ft.data.validation import BadRecord
from nvila_ft.domains.medical.answers import answer_type
from nvila_ft.metrics import normalize_answer

LAYOUTS = ("vqa_rad", "slake", "pathvqa", "pmc_vqa")
# Where each layout keeps its images, relative to its annotation file (used when that folder exists).
IMAGE_FOLDERS = {"vqa_rad": "VQA_RAD Image Folder", "slake": "imgs", "pmc_vqa": "figures"}
PMC_VQA_LETTERS = ("A", "B", "C", "D")
_OPTION_PREFIX = re.compile(r"^\s*([A-Da-d])\s*[:.)]\s*")


class MedicalVQA:
    """One medical VQA file in its dataset's own layout (see the module docstring) -> records.

    path: the annotation file (or, for the Hugging Face layouts, a parquet/arrow file, a folder or a glob); layout:
    vqa_rad | slake | pathvqa | pmc_vqa; media_root: the image folder (default: the layout's folder beside
    the file, else the file's folder); language: SLAKE's q_lang to keep (null: all); split: VQA-RAD's
    official split (train | test | null); limit: the first records kept.
    """

    def __init__(
        self,
        path: str,
        layout: str,
        media_root: str | None = None,
        language: str | None = "en",
        split: str | None = None,
        limit: int | None = None,
        on_error: str = "raise",
    ) -> None:
        if layout not in LAYOUTS:
            raise DataError(f"{path}: unknown medical VQA layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        if split not in (None, "train", "test"):
            raise DataError(f"{path}: split {split!r}: use train, test or null (VQA-RAD's official split)")
        if split is not None and layout != "vqa_rad":
            raise DataError(f"{path}: split= is VQA-RAD's official split; {layout} ships one file per split")
        self.path, self.layout, self.media_root = str(path), layout, media_root
        self.language, self.split, self.limit = language, split, limit
        self.on_error = check_on_error(on_error)
        self.errors: list[BadRecord] = []  # malformed records of the last records() call (on_error="collect")

    def records(self) -> list[Record]:
        self.errors = []
        file = Path(self.path)
        if file.suffix.lower() in PICKLE_SUFFIXES:
            raise DataError(
                f"{self.path}: a pickle, which can run arbitrary code when loaded, so nvila-ft does not read it; "
                "convert it to parquet or JSON Lines with image, question and answer fields (the layout of the "
                "Hugging Face copy of PathVQA), e.g. by loading it once in a trusted session"
            )
        if self.reads_hugging_face():
            return self._hugging_face()
        if not file.exists():
            raise DataError(f"{self.path}: no such file or folder")
        root = self._root(file)
        out: list[Record] = []
        other_languages: set[str | None] = set()  # of the records a filter (language, split) left out
        filtered = 0
        for index, entry in self._entries(file):
            if self.limit is not None and len(out) >= self.limit:
                break
            origin = f"{self.path}[{index}]"
            try:
                record = self._record(entry, origin, root)
            except RecordProblem as problem:
                report(self, origin, problem)
                continue
            if record is not None:
                out.append(record)
            else:
                filtered += 1
                other_languages.add(_optional_text(entry, "q_lang"))
        if not out and filtered:
            raise DataError(f"{self.path}: {self._filter_left_nothing(other_languages)}")
        return out

    def _filter_left_nothing(self, languages: set[str | None]) -> str:
        """Why a file whose records were all filtered out gave none, and what to set instead."""
        if self.layout == "slake":
            found = ", ".join(sorted(str(language) for language in languages))
            return f"no record has q_lang {self.language!r} (the file's q_lang values: {found}); set language to one of them, or null for all"
        return (f"no record is in VQA-RAD's {self.split} split (test questions have a phrase_type starting with 'test'); "
                "set split to null to keep every question")

    # -- files
    def reads_hugging_face(self) -> bool:
        """Whether `path` is a Hugging Face copy (parquet/arrow, a folder or a glob) rather than an annotation file."""
        return glob.has_magic(self.path) or Path(self.path).is_dir() or Path(self.path).suffix.lower() in (".parquet", ".arrow")

    def media_folder(self) -> str:
        """The folder the annotation file's image paths are relative to (absolute)."""
        return self._root(Path(self.path))

    def subset_files(self) -> list[SubsetFile]:
        """The annotation file; for a Hugging Face copy, the files of its HFDataset (its records are that one's rows)."""
        if self.reads_hugging_face():
            return self.hugging_face_source().subset_files()
        return [SubsetFile(self.path, self.media_folder(), Path(self.path).name, self)]

    def write_subset(self, file: SubsetFile, indices: set[int], out: Path) -> WrittenSubset:
        """The kept entries of the annotation file as the release writes them (PMC-VQA: rows of its table)."""
        delimiter = table_delimiter(Path(file.prefix)) if self.layout == "pmc_vqa" else None
        return write_entries(file, indices, out, delimiter)

    def _root(self, file: Path) -> str:
        folder = IMAGE_FOLDERS.get(self.layout)
        default = file.parent / folder if folder and (file.parent / folder).is_dir() else file.parent
        return resolve_media_root(self.media_root, default)

    def _entries(self, file: Path) -> Iterator[tuple[int, Any]]:
        if self.layout == "pmc_vqa":
            if file.suffix.lower() not in (".csv", ".tsv", ".tab"):
                raise DataError(f"{self.path}: a pmc_vqa file is the release's CSV table, not {file.suffix or 'extensionless'}")
            return self._csv_rows(file)
        if file.suffix.lower() not in (".json", ".jsonl", ".ndjson"):
            raise DataError(f"{self.path}: a {self.layout} file is JSON or JSON Lines (or parquet/arrow), not {file.suffix or 'extensionless'}")
        return json_entries(file, self.path)

    def _csv_rows(self, file: Path) -> Iterator[tuple[int, Any]]:
        header, rows = table_rows(file, self.path, table_delimiter(file))
        columns = [c.strip() for c in header or []]
        required = ["Figure_path", "Question", "Answer_label"] + [f"Choice {letter}" for letter in PMC_VQA_LETTERS]
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"{self.path}: not a PMC-VQA table: no column(s) {missing} (columns: {columns})")
        for index, row in enumerate(rows):
            yield index, {(k.strip() if isinstance(k, str) else k): v for k, v in row.items()}

    def hugging_face_source(self) -> HFDataset:
        """The HFDataset that reads the Hugging Face copies of VQA-RAD / PathVQA (image, question, answer columns)."""
        if self.layout not in ("vqa_rad", "pathvqa"):
            raise DataError(f"{self.path}: {self.layout} is read from its own annotation file, not parquet/arrow/a folder")
        return HFDataset(self.path, media_root=self.media_root, question_column="question", answer_column="answer",
                         image_column="image", image_required=True, limit=self.limit, on_error=self.on_error)

    def _hugging_face(self) -> list[Record]:
        source = self.hugging_face_source()
        try:
            records = source.records()
        except MissingImageColumn as e:
            own = {"vqa_rad": "VQA_RAD Dataset Public.json", "pathvqa": None}[self.layout]
            hint = f"; for the official release give its annotation file, path=<folder>/{own}" if own else ""
            raise DataError(f"{self.path}: read as the Hugging Face copy of {self.layout}, but no row has an image "
                            f"(no 'image' column){hint}") from e
        self.errors = list(source.errors)
        for record in records:
            record.meta = {**record.meta, "question_type": _yes_no_type(record.answer or ""), "dataset": self.layout}
        return records

    # -- one record
    def _record(self, entry: Any, origin: str, root: str) -> Record | None:
        if isinstance(entry, RecordProblem):
            raise entry
        if not isinstance(entry, dict):
            raise RecordProblem(f"expected a dict (a {self.layout} record), got {describe_value(entry)}")
        if self.layout == "pmc_vqa":
            return self._pmc_vqa(entry, origin, root)
        if self.layout == "vqa_rad" and "image_name" in entry:
            return self._vqa_rad(entry, origin, root)
        if self.layout == "slake":
            return self._slake(entry, origin, root)
        return self._image_question_answer(entry, origin, root)

    def _vqa_rad(self, entry: dict[str, Any], origin: str, root: str) -> Record | None:
        phrase = _optional_text(entry, "phrase_type")
        if self.split is not None and (phrase or "").lower().startswith("test") != (self.split == "test"):
            return None
        kind = _answer_type(entry)
        meta = {"organ": _optional_text(entry, "image_organ"), "category": _optional_text(entry, "question_type"),
                "phrase_type": phrase}
        return self._build(entry, origin, root, "image_name", kind, meta, "qid")

    def _slake(self, entry: dict[str, Any], origin: str, root: str) -> Record | None:
        language = _optional_text(entry, "q_lang")
        if self.language is not None and language != self.language:
            return None
        kind = _answer_type(entry)
        meta = {"language": language, "modality": _optional_text(entry, "modality"),
                "location": _optional_text(entry, "location"), "content_type": _optional_text(entry, "content_type"),
                "base_type": _optional_text(entry, "base_type"), "image_id": _optional_text(entry, "img_id")}
        return self._build(entry, origin, root, "img_name", kind, meta, "qid")

    def _image_question_answer(self, entry: dict[str, Any], origin: str, root: str) -> Record:
        """The Hugging Face JSON(L) layout: {image, question, answer[, id|qid]}; yes/no answers are closed."""
        kind = _yes_no_type(_text(entry, "answer", kind="no_answer"))
        return self._build(entry, origin, root, "image", kind, {}, "qid" if "qid" in entry else "id")

    def _build(
        self, entry: dict[str, Any], origin: str, root: str, image_field: str, kind: str | None,
        meta: dict[str, Any], id_field: str,
    ) -> Record:
        question = _text(entry, "question")
        answer = _text(entry, "answer", kind="no_answer")
        image = None if entry.get(image_field) is None and entry.get("video") is not None else _image_value(entry, image_field)
        images = [image.rstrip("/") if isinstance(image, str) else image] if image is not None else []
        videos = []
        if entry.get("video") is not None:
            videos.append(_image_value(entry, "video"))
        kind = kind or answer_type(None, answer)
        meta = {"question_type": kind, "dataset": self.layout} | {k: v for k, v in meta.items() if v is not None}
        return Record(question_answer(images, videos, question, answer), origin, _optional_text(entry, id_field), root, meta)

    def _pmc_vqa(self, row: dict[str, Any], origin: str, root: str) -> Record:
        question = _text(row, "Question")
        figure = _text(row, "Figure_path")
        options = {}
        for letter in PMC_VQA_LETTERS:
            value = _optional_text(row, f"Choice {letter}")
            if value:
                prefix = _OPTION_PREFIX.match(value)
                options[letter] = value[prefix.end():].strip() if prefix and prefix.group(1).upper() == letter else value
        label = _text(row, "Answer_label", kind="no_answer").upper()
        if label not in options:
            raise RecordProblem(f"field 'Answer_label': {label!r} is not one of the options {sorted(options)}")
        prompt = "\n".join([question] + [f"{letter}. {text}" for letter, text in options.items()])
        meta = {"question_type": "choice", "dataset": "pmc_vqa", "choices": options,
                "answer_text": _optional_text(row, "Answer") or options[label]}
        record_id = _optional_text(row, "index") or _optional_text(row, "qid")
        return Record(question_answer([figure], [], prompt, label), origin, record_id, root, meta)


def _yes_no_type(answer: str) -> str:
    """PathVQA's answer type (and the one of VQA-RAD's Hugging Face copy, which has none): "closed" for an answer
    that is exactly yes or no, else "open"."""
    return "closed" if normalize_answer(answer) in ("yes", "no") else "open"


def _answer_type(entry: dict[str, Any]) -> str:
    value = entry.get("answer_type")
    kind = str(value).strip().upper() if isinstance(value, str) else None
    if kind not in ("CLOSED", "OPEN"):
        raise RecordProblem(f"field 'answer_type': expected CLOSED or OPEN, got {describe_value(value)}")
    return kind.lower()


def _text(entry: dict[str, Any], field: str, kind: str = "structure") -> str:
    """A required text field; numbers (an answer of 2) are written as text."""
    value = entry.get(field)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        if value is None or value == "":
            raise RecordProblem(f"field {field!r}: missing or empty", kind=kind)
        raise RecordProblem(f"field {field!r}: expected text, got {describe_value(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordProblem(f"field {field!r}: expected text, got {value!r} (an empty spreadsheet cell?)", kind=kind)
    text = str(value).strip()
    if not text:
        raise RecordProblem(f"field {field!r}: missing or empty", kind=kind)
    return text


def _optional_text(entry: dict[str, Any], field: str) -> str | None:
    value = entry.get(field)
    return None if value is None or (isinstance(value, str) and not value.strip()) else str(value).strip()


def _image_value(entry: dict[str, Any], field: str) -> Any:
    """A media field (image or video): a relative path, or (Hugging Face JSON) a {"path"} dict."""
    value = entry.get(field)
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, dict) and isinstance(value.get("path"), str) and value["path"]:
        return value["path"]
    if value is None or value == "":
        raise RecordProblem(f"field {field!r}: missing or empty (the media file)")
    raise RecordProblem(f"field {field!r}: expected a file path, got {describe_value(value)}")

