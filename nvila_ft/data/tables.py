"""A question/answer table (CSV, TSV or JSON Lines) plus a folder of media, as records."""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nvila_ft.data.kit import (
    DataError,
    RecordProblem,
    SubsetFile,
    WrittenSubset,
    answer_text,
    check_on_error,
    describe_value,
    json_entries,
    limited,
    optional_id,
    question_answer,
    question_type_meta,
    report,
    resolve_media_root,
    table_rows,
    table_delimiter,
    with_system_prompt,
)
from nvila_ft.data.records import Record
from nvila_ft.data.subset import file_of, write_entries
from nvila_ft.data.validation import BadRecord

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")


class TableSource:
    """A question/answer table (CSV, TSV or JSON Lines) plus a folder of media.

    One row -> one user turn (media, then `question_template` filled from the row's columns, e.g.
    "Answer with one word. {question}") and one answer. Image/video cells are paths relative to `media_root`
    (default: the table's folder); JSON rows may list several. The delimiter is a tab for `.tsv`/`.tab`,
    a comma otherwise, unless `delimiter` is given. A row whose answer is empty, or that lacks a column
    the template names, is a malformed record; with `image_required`, so is a row whose image cell is empty.
    """

    def __init__(
        self,
        path: str,
        media_root: str | None = None,
        question_column: str = "question",
        answer_column: str = "answer",
        image_column: str | None = "image",
        video_column: str | None = None,
        id_column: str | None = "id",
        question_template: str = "{question}",
        system_prompt: str | None = None,
        delimiter: str | None = None,
        image_required: bool = False,
        limit: int | None = None,
        on_error: str = "raise",
    ) -> None:
        self.path, self.media_root = str(path), media_root
        self.image_required = image_required
        self.question_column, self.answer_column = question_column, answer_column
        self.image_column, self.video_column, self.id_column = image_column, video_column, id_column
        self.question_template, self.system_prompt = question_template, system_prompt
        self.delimiter, self.limit = delimiter, limit
        self.on_error = check_on_error(on_error)
        self.errors: list[BadRecord] = []  # malformed records of the last records() call (on_error="collect")
        self._template_fields = _template_columns(question_template)

    def records(self) -> list[Record]:
        self.errors = []
        file = Path(self.path)
        root = resolve_media_root(self.media_root, file.parent)
        out = []
        for index, row in limited(self._rows(file), self.limit):
            origin = f"{self.path}[{index}]"
            try:
                messages = with_system_prompt(self._messages(row), self.system_prompt)
                record_id = optional_id(row.get(self.id_column)) if self.id_column else None
                out.append(Record(messages, origin, record_id, root, question_type_meta(row)))
            except RecordProblem as problem:
                report(self, origin, problem)
        return out

    def subset_files(self) -> list[SubsetFile]:
        return file_of(self, self.path, self.media_root)

    def write_subset(self, file: SubsetFile, indices: set[int], out: Path) -> WrittenSubset:
        path = Path(file.prefix)
        return write_entries(file, indices, out, None if path.suffix.lower() in JSON_SUFFIXES else table_delimiter(path, self.delimiter))

    def _rows(self, file: Path) -> Iterator[tuple[int, Any]]:
        suffix = file.suffix.lower()
        if suffix in JSON_SUFFIXES:
            yield from json_entries(file, self.path)
            return
        header, rows = table_rows(file, self.path, table_delimiter(file, self.delimiter))
        if header is None:
            raise DataError(f"{self.path}: empty table (no header row)")
        yield from enumerate(rows)

    def _messages(self, row: Any) -> list[dict[str, Any]]:
        if isinstance(row, RecordProblem):
            raise row
        if not isinstance(row, dict):
            raise RecordProblem(f"expected a row object, got {describe_value(row)}")
        values = {k: ("" if v is None else v) for k, v in row.items() if isinstance(k, str)}
        missing = [f for f in self._template_fields if f not in row]
        if missing:
            raise RecordProblem(f"question_template names column(s) {missing} that this row lacks")
        question = self.question_template.format_map(values).strip()
        answer = answer_text(row.get(self.answer_column), f"column {self.answer_column!r}")
        images = _table_media(row.get(self.image_column), self.image_column) if self.image_column else []
        videos = _table_media(row.get(self.video_column), self.video_column) if self.video_column else []
        if self.image_required and not images:
            raise RecordProblem(f"column {self.image_column!r}: no image (empty), and this table's records need one "
                                 "(image_required)", kind="missing_media")
        return question_answer(images, videos, question, answer)


def _template_columns(template: str) -> list[str]:
    """The columns a question template names; only plain `{column}` fields, so filling it cannot fail."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:
        raise DataError(f"question_template {template!r}: {e}") from e
    for name, spec, conversion in fields:
        if not name or any(c in name for c in ".[]") or spec or conversion:
            raise DataError(
                f"question_template {template!r}: use plain column names in braces, e.g. "
                "'Answer with one word. {question}' (write {{ and }} for literal braces)"
            )
    return [name for name, _, _ in fields]


def _table_media(value: Any, column: str) -> list[str]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in items):
        raise RecordProblem(f"column {column!r}: expected a path or a list of paths, got {describe_value(value)}")
    return [item.strip() for item in items if item.strip()]


