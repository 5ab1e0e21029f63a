"""Data sources: files on disk -> `list[Record]`, one small class per layout.

Each source's constructor arguments are exactly its config keys, so a task YAML builds it directly:

    data:
      _target_: nvila_ft.data.sources.LlavaJson
      path: /data/slake/train.json
      limit: 1000

Sources read structure only: media paths stay as written (relative to the record's `media_root`) and are
neither opened nor checked here, so that `nvila_ft.data.validation` reports missing, corrupt or unsafe media
for every record at once. A file that cannot be read at all raises `DataError`. A record that is malformed
(not a dict, a missing or mistyped field, no answer) raises `DataError` naming the file, the record index and
the field, unless the source is built with `on_error="collect"`: then it lands in `source.errors` as a
`BadRecord` and the good records are still returned.
"""

from __future__ import annotations

import csv
import glob
import json
import random
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from nvila_ft.data.conversation import ConversationError, count_media_tags, llava_to_messages
from nvila_ft.data.media import EncodedImage
from nvila_ft.data.records import Record
from nvila_ft.data.validation import BadRecord
from nvila_ft.errors import UserError

ON_ERROR = ("raise", "collect")
# Keys of a LLaVA record that hold media, in the order the official loader places them.
LLAVA_MEDIA_FIELDS = (("image", "image"), ("images", "image"), ("video", "video"), ("videos", "video"))
# `datasets` builders for local data files, by file extension.
HF_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
# Never read: unpickling runs arbitrary code.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pk")


class DataError(UserError, ValueError):
    """A data file, or a record in it, that cannot be used; the message names the file, record and field."""


class MissingImageColumn(DataError):
    """A dataset whose records need an image has no image column at all."""


class _RecordProblem(Exception):
    """One record is malformed; carries the BadRecord kind. Internal: turned into DataError or a BadRecord."""

    def __init__(self, reason: str, kind: str = "structure") -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


def _check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def _report(source: Any, origin: str, problem: _RecordProblem) -> None:
    """Raise a malformed record as DataError, or collect it in `source.errors`, as `source.on_error` says."""
    if _check_on_error(source.on_error) == "raise":
        raise DataError(f"{origin}: {problem.reason}") from problem
    source.errors.append(BadRecord(origin=origin, reason=problem.reason, kind=problem.kind))


# ----------------------------------------------------------------------------------------------- LLaVA JSON
class LlavaJson:
    """Official LLaVA/NVILA JSON (`.json`, a list of records) or JSON Lines (`.jsonl`, one record a line).

    A record: {"id": ..., "image": path | [paths], "images": [...], "video": path | [paths],
    "conversations": [{"from": "human" | "gpt", "value": "..."}]}. Media go to the start of the first human
    turn and `<image>`/`<video>` tags are dropped from the text, as the official loader does; the tag and
    media counts are kept in `Record.meta` ("media_tags", "media_counts") so validation can flag records
    whose tags disagree with their media. Media paths are relative to `media_root` (default: the file's folder).
    """

    def __init__(
        self, path: str, media_root: str | None = None, limit: int | None = None, on_error: str = "raise"
    ) -> None:
        self.path, self.media_root, self.limit = str(path), media_root, limit
        self.on_error = _check_on_error(on_error)
        self.errors: list[BadRecord] = []  # malformed records of the last records() call (on_error="collect")

    def records(self) -> list[Record]:
        self.errors = []
        root = _absolute_root(self.media_root, Path(self.path).parent)
        return json_file_records(self, Path(self.path), self.path, lambda entry, origin, _: _llava_record(entry, origin, root))


def json_file_records(
    source: Any, file: Path, name: str, make: Callable[[Any, str, int], Record | list[Record]]
) -> list[Record]:
    """What `make(entry, origin, index)` builds from each entry of a JSON / JSON Lines file (the first
    `source.limit`); an entry's problem (`_RecordProblem`) is reported on `source` as its `on_error` says."""
    out: list[Record] = []
    for index, entry in _limited(_json_entries(file, name), source.limit):
        origin = f"{name}[{index}]"
        try:
            if isinstance(entry, _RecordProblem):  # the entry could not be read (a broken JSON line)
                raise entry
            made = make(entry, origin, index)
        except _RecordProblem as problem:
            _report(source, origin, problem)
            continue
        out += made if isinstance(made, list) else [made]
    return out


def _json_entries(file: Path, name: str) -> Iterator[tuple[int, Any]]:
    """(record index, parsed record) of a JSON list or JSON Lines file; a line that is not JSON yields a
    `_RecordProblem` in place of its record, a JSON list that does not parse raises DataError."""
    text = _read_text(file)
    if _is_json_lines(file, text):  # an empty JSON Lines file holds no record (a pruned subset may be one)
        index = 0
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as e:
                yield index, _RecordProblem(f"line {line_number}: not valid JSON ({e.msg} at column {e.colno})")
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


def _is_json_lines(file: Path, text: str) -> bool:
    if file.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    if file.suffix.lower() == ".json":
        return False
    return not text.lstrip().startswith("[")


def _llava_record(entry: Any, origin: str, media_root: str) -> Record:
    if not isinstance(entry, dict):
        raise _RecordProblem(f"expected a dict (a LLaVA record), got {type(entry).__name__}")
    counts = {"image": 0, "video": 0}
    for key, kind in LLAVA_MEDIA_FIELDS:
        value = entry.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) for item in items):
            raise _RecordProblem(f"field {key!r}: expected a path or a list of paths, got {_describe_value(value)}")
        counts[kind] += len(items)
    messages = _llava_messages(entry, origin)
    return Record(
        messages=messages,
        origin=origin,
        id=_record_id(entry.get("id")),
        media_root=media_root,
        meta=_media_meta(count_media_tags(entry), counts) | _question_type(entry),
    )


def _llava_messages(entry: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    try:
        return llava_to_messages(entry, where=origin)
    except ConversationError as e:
        # llava_to_messages names the field ('conversations', conversations[i].value, ...) after `where: `.
        raise _RecordProblem(str(e).removeprefix(f"{origin}: ")) from e


def _question_type(entry: Any) -> dict[str, Any]:
    """{"question_type": ...} when a record (or row) has one, for per-type scores and baselines."""
    value = entry.get("question_type") if isinstance(entry, dict) else None
    return {} if value in (None, "") else {"question_type": str(value)}


def _media_meta(tags: dict[str, int], media: dict[str, int]) -> dict[str, Any]:
    return {"media_tags": dict(tags), "media_counts": dict(media)}


# ----------------------------------------------------------------------------------------------- Hugging Face
class HFDataset:
    """A Hugging Face `datasets` dataset on local disk: a `save_to_disk` folder or data files.

    `path` is a `save_to_disk` folder (a DatasetDict picks `split`), or a data file, a glob, or a folder of
    data files (parquet, arrow, json/jsonl, csv; `data_format` is inferred from the extension when None).
    Never a hub id: nothing is downloaded, and a path that does not exist is a DataError.

    Columns become a conversation by the first mapping that applies:
    1. `messages_column`: chat messages ({"role", "content"}); image parts without a source (placeholders,
       as in TRL's vision datasets) are filled in order from `image_column`; with no image parts at all the
       column's images go before the text of the first user turn.
    2. `conversations_column`: LLaVA turns ({"from", "value"}), with `image_column`/`video_column` as the
       record's media (placed as the official loader places them).
    3. `question_column` + `answer_column`: one user turn (media, then the question) and one answer.
    Image cells may hold decoded images (`datasets.Image`), {"bytes", "path"} dicts, path strings, or lists of
    those. A video cell is a path or a list of paths (one video each), or a list of PIL frames (one video).
    Media already inside the messages win over the columns. `system_prompt` is added as a system message to
    conversations that have none; an `id` column, when present, gives the record ids. `image_required`: a row
    whose image cell is empty is a bad record (missing_media) instead of a text-only sample.
    Images are decoded when a record is processed, not while rows are read (`datasets.Image(decode=False)`), so
    a row whose image is truncated or not an image is one bad record (corrupt_media) naming its row and column,
    and a row `datasets` cannot read at all is one bad record too.
    Origins are "<path>[<row>]" (rows of a glob or folder are counted across its files in sorted order).
    """

    def __init__(
        self,
        path: str,
        split: str | None = "train",
        data_format: str | None = None,
        media_root: str | None = None,
        messages_column: str | None = "messages",
        conversations_column: str | None = "conversations",
        image_column: str | None = "image",
        video_column: str | None = None,
        question_column: str | None = None,
        answer_column: str | None = None,
        system_prompt: str | None = None,
        image_required: bool = False,
        limit: int | None = None,
        on_error: str = "raise",
    ) -> None:
        self.path, self.split, self.data_format, self.media_root = str(path), split, data_format, media_root
        self.image_required = image_required
        self.messages_column, self.conversations_column = messages_column, conversations_column
        self.image_column, self.video_column = image_column, video_column
        self.question_column, self.answer_column = question_column, answer_column
        self.system_prompt, self.limit = system_prompt, limit
        self.on_error = _check_on_error(on_error)
        self.errors: list[BadRecord] = []  # malformed records of the last records() call (on_error="collect")

    def records(self) -> list[Record]:
        self.errors = []
        dataset, origin_prefix, default_root = self._load()
        if self.limit is not None:
            dataset = dataset.select(range(min(self.limit, len(dataset))))
        convert = self._mapping(set(dataset.column_names))
        root = _absolute_root(self.media_root, default_root)
        if self.image_required and self.image_column not in dataset.column_names:
            raise MissingImageColumn(f"{self.path}: has no column {self.image_column!r} for the images its records need "
                                     f"(columns: {sorted(dataset.column_names)})")
        dataset = _without_image_decoding(dataset)
        out = []
        for index in range(len(dataset)):
            origin = f"{origin_prefix}[{index}]"
            try:
                row = _row(dataset, index)
                messages, meta = convert(row, origin)
                messages = _with_system_prompt(messages, self.system_prompt)
                record_id = _record_id(row.get("id"))
                meta = meta | _question_type(row)
                out.append(Record(messages=messages, origin=origin, id=record_id, media_root=root, meta=meta))
            except _RecordProblem as problem:
                _report(self, origin, problem)
        return out

    # -- loading
    def _load(self) -> tuple[Any, str, Path]:
        """(dataset, origin prefix, default media root)."""
        import datasets

        path = Path(self.path)
        if path.is_dir() and _is_saved_dataset(path):
            try:
                loaded = datasets.load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001 - any failure of a local folder is "cannot be read"
                raise DataError(f"{self.path}: cannot load the saved dataset ({type(e).__name__}: {e})") from e
            if isinstance(loaded, datasets.DatasetDict):
                split = self._pick_split(list(loaded))
                return loaded[split], str(path / split), path
            return loaded, self.path, path
        files, default_root = _data_files(self.path)
        builder = self._builder(files)
        split = self.split or "train"
        try:
            dataset = datasets.load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split)
        except Exception as e:  # noqa: BLE001 - as above: the file is unreadable, whatever the builder says
            raise DataError(f"{self.path}: cannot load as {builder} ({type(e).__name__}: {e})") from e
        return dataset, self.path, default_root

    def _pick_split(self, splits: list[str]) -> str:
        if self.split is None:
            if len(splits) == 1:
                return splits[0]
            raise DataError(f"{self.path}: holds splits {splits}; choose one with split=")
        if self.split not in splits:
            raise DataError(f"{self.path}: has no split {self.split!r} (it has {splits})")
        return self.split

    def _builder(self, files: list[Path]) -> str:
        if self.data_format is not None:
            fmt = self.data_format.lower().lstrip(".")
            builder = HF_FORMATS.get(f".{fmt}")
            if builder is None:
                raise DataError(
                    f"{self.path}: unknown data_format {self.data_format!r} (use parquet, arrow, json, jsonl or csv)"
                )
            return builder
        builders = {HF_FORMATS.get(f.suffix.lower()) for f in files}
        if None in builders or len(builders) != 1:
            suffixes = sorted({f.suffix or "(none)" for f in files})
            raise DataError(
                f"{self.path}: cannot infer the data format from extension(s) {suffixes}; set data_format "
                "(parquet, arrow, json, jsonl or csv)"
            )
        return builders.pop()

    # -- columns -> messages
    def _mapping(self, columns: set[str]):
        if self.messages_column and self.messages_column in columns:
            return self._from_messages
        if self.conversations_column and self.conversations_column in columns:
            return self._from_conversations
        if self.question_column and self.answer_column:
            missing = [c for c in (self.question_column, self.answer_column) if c not in columns]
            if not missing:
                return self._from_question_answer
            raise DataError(f"{self.path}: has no column(s) {missing} (columns: {sorted(columns)})")
        raise DataError(
            f"{self.path}: found none of messages_column={self.messages_column!r}, "
            f"conversations_column={self.conversations_column!r}, and no question_column/answer_column were "
            f"given (columns: {sorted(columns)})"
        )

    def _media(self, row: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        images = _image_cell(row.get(self.image_column), self.image_column) if self.image_column else []
        videos = _video_cell(row.get(self.video_column), self.video_column) if self.video_column else []
        if self.image_required and not images:
            raise _RecordProblem(f"column {self.image_column!r}: no image (empty or null), and this dataset's "
                                 "records need one (image_required)", kind="missing_media")
        return images, videos

    def _from_messages(self, row: dict[str, Any], origin: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        raw = row[self.messages_column]
        if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
            raise _RecordProblem(
                f"column {self.messages_column!r}: expected a non-empty list of messages, got {_describe_value(raw)}"
            )
        images, videos = self._media(row)
        messages = [_clean_message(m) for m in raw]
        parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"] if isinstance(p, dict)]
        image_parts = [p for p in parts if p.get("type") == "image"]
        placeholders = [p for p in image_parts if _is_placeholder(p)]
        if placeholders:
            if len(placeholders) != len(images):
                raise _RecordProblem(
                    f"column {self.messages_column!r}: {len(placeholders)} image placeholder(s) but "
                    f"{len(images)} image(s) in column {self.image_column!r}"
                )
            for part, image in zip(placeholders, images):
                part["image"] = image
        # Media the messages already carry are authoritative: the columns only fill placeholders or, for a
        # conversation that has no media part of that kind, go before the first user text.
        images = [] if image_parts else images
        videos = [] if any(p.get("type") == "video" for p in parts) else videos
        if images or videos:
            messages = _prepend_media(messages, images, videos, self.messages_column)
        return messages, {}

    def _from_conversations(self, row: dict[str, Any], origin: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        turns = row[self.conversations_column]
        images, videos = self._media(row)
        entry = {"conversations": turns, "image": images or None, "video": videos or None}
        messages = _llava_messages(entry, origin)
        return messages, _media_meta(count_media_tags(entry), {"image": len(images), "video": len(videos)})

    def _from_question_answer(self, row: dict[str, Any], origin: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        question, answer = row[self.question_column], row[self.answer_column]
        if question is None:
            raise _RecordProblem(f"column {self.question_column!r}: empty")
        answer = _answer_text(answer, f"column {self.answer_column!r}")
        images, videos = self._media(row)
        return _question_answer(images, videos, str(question), answer), {}


def _without_image_decoding(dataset: Any) -> Any:
    """The dataset with every image column (or list of images) left encoded ({"bytes", "path"}): `datasets` would
    decode a whole row's images as it is read, and one truncated image would end the reading of the file."""
    import datasets

    def undecoded(feature: Any) -> Any:
        if isinstance(feature, datasets.Image):
            return datasets.Image(mode=feature.mode, decode=False)
        if isinstance(feature, (datasets.List, datasets.LargeList, datasets.Sequence)):
            inner = undecoded(feature.feature)
            return feature if inner is feature.feature else type(feature)(inner)
        if isinstance(feature, dict):
            inner = {k: undecoded(v) for k, v in feature.items()}
            return feature if all(inner[k] is feature[k] for k in feature) else inner
        return feature

    for column, feature in dataset.features.items():
        changed = undecoded(feature)
        if changed is not feature:
            dataset = dataset.cast_column(column, changed)
    return dataset


def _row(dataset: Any, index: int) -> dict[str, Any]:
    try:
        return dataset[index]
    except Exception as e:  # noqa: BLE001 - whatever `datasets` / Arrow raise for a row they cannot give
        raise _RecordProblem(f"row cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                             kind="corrupt_media") from e


def _is_saved_dataset(path: Path) -> bool:
    from datasets import config

    names = (config.DATASETDICT_JSON_FILENAME, config.DATASET_STATE_JSON_FILENAME)
    return any((path / name).is_file() for name in names)


def _data_files(spec: str) -> tuple[list[Path], Path]:
    """The local files `spec` (a file, a folder or a glob) names, and the folder media are relative to."""
    path = Path(spec)
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: no file matches this pattern")
        return files, Path(*_static_prefix(path.parts))
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        # Top level only: a downloaded dataset repo keeps train and test files in subfolders, and merging
        # them silently would be worse than asking for a glob.
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in HF_FORMATS and not p.name.startswith(".")
        )
        if not files:
            raise DataError(
                f"{spec}: folder holds neither a saved dataset nor data files ({', '.join(HF_FORMATS)}) at its top "
                f"level; for files in subfolders give a glob such as '{path / '**' / '*.parquet'}'"
            )
        return files, path
    raise DataError(f"{spec}: no such file or folder (datasets are read from local disk only, never from the hub)")


def _static_prefix(parts: Sequence[str]) -> list[str]:
    """The leading components of a glob that hold no wildcard (its base folder); "." when there are none."""
    prefix = []
    for part in parts:
        if glob.has_magic(part):
            break
        prefix.append(part)
    return prefix or ["."]


def _image_cell(value: Any, column: str) -> list[Any]:
    """An image cell -> list of sources the processor takes (PIL image, bytes or path)."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, Image.Image) or (isinstance(item, str) and item):
            out.append(item)
        elif isinstance(item, (bytes, bytearray)):
            out.append(EncodedImage(item, f"column {column!r}"))
        elif isinstance(item, dict) and item.get("bytes") is not None:
            out.append(EncodedImage(item["bytes"], f"column {column!r}"))
        elif isinstance(item, dict) and item.get("path"):
            out.append(item["path"])
        elif item is None or item == "":
            continue
        else:
            raise _RecordProblem(
                f"column {column!r}: expected images, paths or {{'bytes', 'path'}} dicts, got {_describe_value(item)}"
            )
    return out


def _video_cell(value: Any, column: str) -> list[Any]:
    """A video cell -> list of videos (each a path, or a list of frames)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and value.get("path"):
        return [value["path"]]
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Image.Image) for v in value):
            return [list(value)]
        if all(isinstance(v, str) for v in value):
            return [v for v in value if v]
    raise _RecordProblem(
        f"column {column!r}: expected a video path, a list of paths or a list of frames, got {_describe_value(value)}"
    )


def _is_placeholder(part: dict[str, Any]) -> bool:
    return all(part.get(key) is None for key in ("image", "path", "url"))


def _clean_message(message: dict[str, Any]) -> dict[str, Any]:
    """Copy a message, dropping the None fields Arrow adds when it unifies struct types across rows."""
    content = message.get("content")
    if isinstance(content, list):
        content = [
            {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part for part in content
        ]
    return {**{k: v for k, v in message.items() if v is not None}, "content": content}


def _prepend_media(
    messages: list[dict[str, Any]], images: list[Any], videos: list[Any], column: str
) -> list[dict[str, Any]]:
    """Put media before the text of the first user message (images, then videos)."""
    media = [{"type": "image", "image": i} for i in images] + [{"type": "video", "video": v} for v in videos]
    for k, message in enumerate(messages):
        if message.get("role") in ("user", "human"):
            content = message.get("content")
            content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            return messages[:k] + [{**message, "content": media + content}] + messages[k + 1:]
    raise _RecordProblem(f"column {column!r}: has media but no user message to attach them to")


# ----------------------------------------------------------------------------------------------- tables
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
        self.on_error = _check_on_error(on_error)
        self.errors: list[BadRecord] = []  # malformed records of the last records() call (on_error="collect")
        self._template_fields = _template_columns(question_template)

    def records(self) -> list[Record]:
        self.errors = []
        file = Path(self.path)
        root = _absolute_root(self.media_root, file.parent)
        out = []
        for index, row in _limited(self._rows(file), self.limit):
            origin = f"{self.path}[{index}]"
            try:
                messages = _with_system_prompt(self._messages(row), self.system_prompt)
                record_id = _record_id(row.get(self.id_column)) if self.id_column else None
                out.append(Record(messages, origin, record_id, root, _question_type(row)))
            except _RecordProblem as problem:
                _report(self, origin, problem)
        return out

    def _rows(self, file: Path) -> Iterator[tuple[int, Any]]:
        suffix = file.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".json"):
            yield from _json_entries(file, self.path)
            return
        text = _read_text(file)
        delimiter = self.delimiter or ("\t" if suffix in (".tsv", ".tab") else ",")
        try:
            reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
            rows = list(reader)
        except csv.Error as e:
            raise DataError(f"{self.path}: cannot read as a table (line {reader.line_num}: {e})") from e
        if reader.fieldnames is None:
            raise DataError(f"{self.path}: empty table (no header row)")
        yield from enumerate(rows)

    def _messages(self, row: Any) -> list[dict[str, Any]]:
        if isinstance(row, _RecordProblem):
            raise row
        if not isinstance(row, dict):
            raise _RecordProblem(f"expected a row object, got {_describe_value(row)}")
        values = {k: ("" if v is None else v) for k, v in row.items() if isinstance(k, str)}
        missing = [f for f in self._template_fields if f not in row]
        if missing:
            raise _RecordProblem(f"question_template names column(s) {missing} that this row lacks")
        question = self.question_template.format_map(values).strip()
        answer = _answer_text(row.get(self.answer_column), f"column {self.answer_column!r}")
        images = _table_media(row.get(self.image_column), self.image_column) if self.image_column else []
        videos = _table_media(row.get(self.video_column), self.video_column) if self.video_column else []
        if self.image_required and not images:
            raise _RecordProblem(f"column {self.image_column!r}: no image (empty), and this table's records need one "
                                 "(image_required)", kind="missing_media")
        return _question_answer(images, videos, question, answer)


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
        raise _RecordProblem(f"column {column!r}: expected a path or a list of paths, got {_describe_value(value)}")
    return [item.strip() for item in items if item.strip()]


# ----------------------------------------------------------------------------------------------- mixtures
class Mixture:
    """Several sources read as one: their records one after another, in the order given (training shuffles).

        train:
          _target_: nvila_ft.data.sources.Mixture
          sources:
            - {_target_: nvila_ft.data.sources.LlavaJson, path: /data/a.json}
            - {_target_: nvila_ft.data.sources.TableSource, path: /data/b.csv}
    """

    def __init__(self, sources: Sequence[Any]) -> None:
        if not sources:
            raise DataError("Mixture: give at least one source")
        self.sources = list(sources)
        self.errors: list[BadRecord] = []

    @property
    def on_error(self) -> str | None:
        return getattr(self.sources[0], "on_error", None)

    @on_error.setter
    def on_error(self, value: str) -> None:
        for source in self.sources:
            if hasattr(source, "on_error"):
                source.on_error = value

    def records(self) -> list[Record]:
        out, self.errors = [], []
        for source in self.sources:
            out += source.records()
            self.errors += list(getattr(source, "errors", []))
        return out


# ----------------------------------------------------------------------------------------------- shared
def _question_answer(images: list[Any], videos: list[Any], question: str, answer: str) -> list[dict[str, Any]]:
    content = [{"type": "image", "image": i} for i in images] + [{"type": "video", "video": v} for v in videos]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


def _answer_text(value: Any, field: str) -> str:
    text = "" if value is None else str(value).strip()
    if not text:
        raise _RecordProblem(f"{field}: no answer (empty)", kind="no_answer")
    return text


def _with_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    if not system_prompt or any(m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _record_id(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _absolute_root(media_root: str | None, default: Path) -> str:
    return str(Path(media_root if media_root is not None else default).resolve())


def _read_text(file: Path) -> str:
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise DataError(f"{file}: a pickle, which can run arbitrary code when loaded, so nvila-ft does not read it; "
                        "convert it to JSON or JSON Lines")
    try:
        return file.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: cannot read ({type(e).__name__}: {e})") from e


def _limited(entries: Iterable[tuple[int, Any]], limit: int | None) -> Iterator[tuple[int, Any]]:
    """The first `limit` entries of a file (good or bad), or all of them."""
    for count, entry in enumerate(entries):
        if limit is not None and count >= limit:
            return
        yield entry


def _describe_value(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


# ----------------------------------------------------------------------------------------------- splits
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
