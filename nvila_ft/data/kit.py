"""The data-source kit: what every source needs to turn files into `Record`s, whatever its layout.

A source reads rows (JSON, JSON Lines or CSV here; parquet, arrow and the rest through `datasets` in
`nvila_ft.data.hf_dataset`), turns each into a Record and reports the rows
it cannot use: a file that cannot be read at all raises `DataError`; a malformed row raises `RecordProblem`
inside the source, which `report` turns into a DataError naming the file, the row and the field, or (the source
built with `on_error="collect"`) into a `BadRecord` in `source.errors`, the good rows still returned. Media
paths stay as written, relative to the record's media root (`media_root`), and are opened, and kept inside that
root, only when the processor loads them (`nvila_ft.data.media_base`).

Every source follows `DataSource`: `records()`, its `errors`, and the two calls `nvila_ft.data.subset` makes to
write a subset of it in its own layout (`subset_files`, `write_subset`).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from nvila_ft.data.records import Record
from nvila_ft.data.validation import BadRecord
from nvila_ft.errors import UserError

ON_ERROR = ("raise", "collect")
# Never read: unpickling runs arbitrary code.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pk")


class DataError(UserError, ValueError):
    """A data file, or a record in it, that cannot be used; the message names the file, record and field."""


class RecordProblem(Exception):
    """One record is malformed; carries the BadRecord kind. Raised inside a source, turned by `report` into a
    DataError or a BadRecord."""

    def __init__(self, reason: str, kind: str = "structure") -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


@dataclass(frozen=True)
class SubsetFile:
    """One input of a source as a subset copies it: the origin prefix its records carry ("<prefix>[<index>]"),
    where its media paths resolve, the output's name, and the source that writes its kept entries."""

    prefix: str
    media_root: str | None
    name: str
    source: Any


@dataclass(frozen=True)
class WrittenSubset:
    source: str  # the input file (or dataset folder) as records name it
    path: Path  # the file (or folder) written
    records: int  # entries written
    media_root: str | None  # where the written file's relative media paths resolve
    layout: str  # llava_json, json_lines, table, hf_saved, hf_files


class DataSource(Protocol):
    """What a task's data source is: a constructor whose arguments are its config keys, and these."""

    on_error: str  # "raise" or "collect"
    errors: list[BadRecord]  # malformed records of the last records() call (on_error="collect")

    def records(self) -> list[Record]:
        """Every usable record, in file order."""

    def subset_files(self) -> list[SubsetFile]:
        """The files its records come from; DataError when no subset of it can be written."""

    def write_subset(self, file: SubsetFile, indices: set[int], out: Path) -> WrittenSubset:
        """The entries `indices` of `file` (one of its `subset_files`) written to `out` in the file's own layout."""


def check_on_error(on_error: str) -> str:
    """`on_error` when it is one of ON_ERROR, else ValueError."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def report(source: Any, origin: str, problem: RecordProblem) -> None:
    """Raise a malformed record as DataError, or collect it in `source.errors`, as `source.on_error` says."""
    if check_on_error(source.on_error) == "raise":
        raise DataError(f"{origin}: {problem.reason}") from problem
    source.errors.append(BadRecord(origin=origin, reason=problem.reason, kind=problem.kind))


# ----------------------------------------------------------------------------------------------- rows
def read_text(file: Path) -> str:
    """A data file's text (a BOM dropped); DataError for a pickle or a file that cannot be read as UTF-8."""
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise DataError(f"{file}: a pickle, which can run arbitrary code when loaded, so nvila-ft does not read it; "
                        "convert it to JSON or JSON Lines")
    try:
        return file.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read ({type(e).__name__}: {e})") from e


def is_json_lines(file: Path, text: str) -> bool:
    """Whether a JSON file holds one record per line: by its suffix, else by whether it starts with a list."""
    if file.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if file.suffix.lower() == ".json":
        return False
    return not text.lstrip().startswith("[")


def table_delimiter(file: Path, delimiter: str | None = None) -> str:
    """A table's delimiter: the one given, else a tab for `.tsv`/`.tab` and a comma otherwise."""
    return delimiter or ("\t" if file.suffix.lower() in (".tsv", ".tab") else ",")


def table_rows(file: Path, name: str, delimiter: str) -> tuple[list[str] | None, list[dict[str, Any]]]:
    """The header (None for an empty file) and the rows of a CSV/TSV table; DataError naming the line that cannot
    be read."""
    reader = csv.DictReader(read_text(file).splitlines(keepends=True), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise DataError(f"{name}: cannot read as a table (line {reader.line_num}: {e})") from e
    return reader.fieldnames, rows


def json_entries(file: Path, name: str) -> Iterator[tuple[int, Any]]:
    """(record index, parsed record) of a JSON list or JSON Lines file; a line that is not JSON yields a
    `RecordProblem` in place of its record, a JSON list that does not parse raises DataError."""
    text = read_text(file)
    if is_json_lines(file, text):  # an empty JSON Lines file holds no record (a pruned subset may be one)
        index = 0
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as e:
                yield index, RecordProblem(f"line {line_number}: not valid JSON ({e.msg} at column {e.colno})")
            index += 1
        return
    if not text.strip():
        raise DataError(f"{name}: empty file (expected a JSON list of records; an empty list is [])")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _first_line_is_json(text):
            raise DataError(
                f"{name}: holds one JSON record per line (JSON Lines) but is named {file.suffix}; rename it to "
                f"{file.with_suffix('.jsonl').name}"
            ) from e
        raise DataError(f"{name}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of records, got a {type(data).__name__}")
    yield from enumerate(data)


def _first_line_is_json(text: str) -> bool:
    line = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def limited(entries: Iterable[tuple[int, Any]], limit: int | None) -> Iterator[tuple[int, Any]]:
    """The first `limit` entries of a file (good or bad), or all of them."""
    for count, entry in enumerate(entries):
        if limit is not None and count >= limit:
            return
        yield entry


def json_file_records(
    source: Any, file: Path, name: str, make: Callable[[Any, str, int], Record | list[Record]]
) -> list[Record]:
    """What `make(entry, origin, index)` builds from each entry of a JSON / JSON Lines file (the first
    `source.limit`); an entry's problem (`RecordProblem`) is reported on `source` as its `on_error` says."""
    out: list[Record] = []
    for index, entry in limited(json_entries(file, name), source.limit):
        origin = f"{name}[{index}]"
        try:
            if isinstance(entry, RecordProblem):  # the entry could not be read (a broken JSON line)
                raise entry
            made = make(entry, origin, index)
        except RecordProblem as problem:
            report(source, origin, problem)
            continue
        out += made if isinstance(made, list) else [made]
    return out


# ----------------------------------------------------------------------------------------------- fields
def describe_value(value: Any) -> str:
    """"int 3", "list [1, 2]": a value's type and (at most 60 characters of) its repr, for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def optional_id(value: Any) -> str | None:
    """A record id as text; None for a missing or empty one."""
    return None if value is None or value == "" else str(value)


def resolve_media_root(given: str | None, default: Path) -> str:
    """The absolute folder a source's relative media paths resolve under (and may not leave): `given`, else `default`."""
    return str(Path(given if given is not None else default).resolve())


def question_type_meta(entry: Any) -> dict[str, Any]:
    """{"question_type": ...} when a record (or row) has one, for per-type scores and baselines."""
    value = entry.get("question_type") if isinstance(entry, dict) else None
    return {} if value in (None, "") else {"question_type": str(value)}


def media_meta(tags: dict[str, int], media: dict[str, int]) -> dict[str, Any]:
    """Record.meta's media tag and media counts, which validation compares."""
    return {"media_tags": dict(tags), "media_counts": dict(media)}


def answer_text(value: Any, field: str) -> str:
    """A row's answer as text; RecordProblem (no_answer) when it is empty."""
    text = "" if value is None else str(value).strip()
    if not text:
        raise RecordProblem(f"{field}: no answer (empty)", kind="no_answer")
    return text


# ----------------------------------------------------------------------------------------------- messages
def question_answer(images: list[Any], videos: list[Any], question: str, answer: str) -> list[dict[str, Any]]:
    """One user turn (images, videos, then the question) and one assistant answer."""
    content = [{"type": "image", "image": i} for i in images] + [{"type": "video", "video": v} for v in videos]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """`messages` with a system message first, unless there is no prompt or they already have one."""
    if not system_prompt or any(m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


# ----------------------------------------------------------------------------------------------- reading all
def split_records(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic random train/validation split; both parts keep the records' original order.

    Records that share a `meta["group"]` (the steps of one robot episode) are held out together, so that no
    validation record has a near-copy in training; `val_fraction` is then the share of groups. The same
    records and seed give the same split on any machine (`random.Random(seed)`, not `hash()`). With
    val_fraction > 0 and more than one group, validation gets at least one group and training keeps at least one.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    records = list(records)
    units = [r.meta.get("group", ("record", i)) for i, r in enumerate(records)]
    distinct = list(dict.fromkeys(units))
    if val_fraction == 0 or len(distinct) < 2:
        return records, []
    count = min(max(1, round(len(distinct) * val_fraction)), len(distinct) - 1)
    chosen = {distinct[i] for i in random.Random(seed).sample(range(len(distinct)), count)}
    train = [r for r, unit in zip(records, units) if unit not in chosen]
    val = [r for r, unit in zip(records, units) if unit in chosen]
    return train, val


def describe(source: Any, records: Sequence[Record] | None = None) -> str:
    """One line: the source's kind, path and record count (reads it when `records` is not given)."""
    if records is None:
        records = source.records()
    errors = getattr(source, "errors", [])
    bad = f", {len(errors)} malformed" if errors else ""
    return f"{type(source).__name__} {getattr(source, 'path', '?')}: {len(records)} records{bad}"
