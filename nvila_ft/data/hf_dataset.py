"""A Hugging Face `datasets` dataset on local disk (a `save_to_disk` folder or data files) as records."""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nvila_ft.atomic import atomic_directory, atomic_write_bytes
from nvila_ft.data.conversation import count_media_tags
from nvila_ft.data.hf_cells import clean_message, image_cell, is_placeholder, prepend_media, video_cell
from nvila_ft.data.kit import (
    DataError,
    RecordProblem,
    SubsetFile,
    WrittenSubset,
    answer_text,
    check_on_error,
    describe_value,
    media_meta,
    optional_id,
    question_answer,
    question_type_meta,
    report,
    resolve_media_root,
    with_system_prompt,
)
from nvila_ft.data.llava import llava_messages
from nvila_ft.data.records import Record
from nvila_ft.data.validation import BadRecord

# `datasets` builders for local data files, by file extension.
HF_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class MissingImageColumn(DataError):
    """A dataset whose records need an image has no image column at all."""


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
        self.on_error = check_on_error(on_error)
        self.errors: list[BadRecord] = []  # malformed records of the last records() call (on_error="collect")

    def records(self) -> list[Record]:
        self.errors = []
        dataset, origin_prefix, default_root = self._load()
        if self.limit is not None:
            dataset = dataset.select(range(min(self.limit, len(dataset))))
        convert = self._mapping(set(dataset.column_names))
        root = resolve_media_root(self.media_root, default_root)
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
                messages = with_system_prompt(messages, self.system_prompt)
                record_id = optional_id(row.get("id"))
                meta = meta | question_type_meta(row)
                out.append(Record(messages=messages, origin=origin, id=record_id, media_root=root, meta=meta))
            except RecordProblem as problem:
                report(self, origin, problem)
        return out

    # -- subsets
    def subset_files(self) -> list[SubsetFile]:
        path = Path(self.path)
        if path.is_dir() or any(c in self.path for c in "*?["):
            name = (path.name if path.is_dir() else path.parent.name or "data") + "-subset"
        else:
            name = path.name
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            split = self._pick_split(json.loads((path / "dataset_dict.json").read_text())["splits"])
            return [SubsetFile(str(path / split), str(Path(self.media_root or path).resolve()), name, self)]
        root = self.media_root or (path if path.is_dir() else path.parent)
        return [SubsetFile(self.path, str(Path(root).resolve()), name, self)]

    def write_subset(self, file: SubsetFile, indices: set[int], out: Path) -> WrittenSubset:
        """The selected rows: `save_to_disk` for a saved dataset, else a data file of the input's format (parquet,
        JSON Lines, CSV; arrow files as a saved dataset)."""
        dataset, _, _ = self._load()
        subset = dataset.select(sorted(indices))
        fmt = (self.data_format or Path(self.path).suffix).lower().lstrip(".")
        if Path(file.prefix).is_dir() or fmt in ("arrow", ""):
            with atomic_directory(out, overwrite=True) as staging:
                subset.save_to_disk(str(staging))
            return WrittenSubset(file.prefix, out, len(subset), file.media_root, "hf_saved")
        staging = out.with_name(f".{out.name}.partial")
        if fmt == "parquet":
            subset.to_parquet(str(staging))
        elif fmt == "csv":
            subset.to_csv(str(staging), index=False)
        else:
            subset.to_json(str(staging), lines=True, force_ascii=False)
        atomic_write_bytes(out, staging.read_bytes())
        staging.unlink()
        return WrittenSubset(file.prefix, out, len(subset), file.media_root, "hf_files")

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
        images = image_cell(row.get(self.image_column), self.image_column) if self.image_column else []
        videos = video_cell(row.get(self.video_column), self.video_column) if self.video_column else []
        if self.image_required and not images:
            raise RecordProblem(f"column {self.image_column!r}: no image (empty or null), and this dataset's "
                                 "records need one (image_required)", kind="missing_media")
        return images, videos

    def _from_messages(self, row: dict[str, Any], origin: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        raw = row[self.messages_column]
        if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
            raise RecordProblem(
                f"column {self.messages_column!r}: expected a non-empty list of messages, got {describe_value(raw)}"
            )
        images, videos = self._media(row)
        messages = [clean_message(m) for m in raw]
        parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"] if isinstance(p, dict)]
        image_parts = [p for p in parts if p.get("type") == "image"]
        placeholders = [p for p in image_parts if is_placeholder(p)]
        if placeholders:
            if len(placeholders) != len(images):
                raise RecordProblem(
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
            messages = prepend_media(messages, images, videos, self.messages_column)
        return messages, {}

    def _from_conversations(self, row: dict[str, Any], origin: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        turns = row[self.conversations_column]
        images, videos = self._media(row)
        entry = {"conversations": turns, "image": images or None, "video": videos or None}
        messages = llava_messages(entry, origin)
        return messages, media_meta(count_media_tags(entry), {"image": len(images), "video": len(videos)})

    def _from_question_answer(self, row: dict[str, Any], origin: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        question, answer = row[self.question_column], row[self.answer_column]
        if question is None:
            raise RecordProblem(f"column {self.question_column!r}: empty")
        answer = answer_text(answer, f"column {self.answer_column!r}")
        images, videos = self._media(row)
        return question_answer(images, videos, str(question), answer), {}


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
        raise RecordProblem(f"row cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
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
