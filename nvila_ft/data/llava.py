"""LLaVA/NVILA JSON: the official training-data layout, read as records.

    data:
      _target_: nvila_ft.data.llava.LlavaJson
      path: /data/slake/train.json
      limit: 1000
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvila_ft.data.conversation import ConversationError, count_media_tags, llava_to_messages
from nvila_ft.data.kit import (
    RecordProblem,
    SubsetFile,
    WrittenSubset,
    check_on_error,
    describe_value,
    json_file_records,
    media_meta,
    optional_id,
    question_type_meta,
    resolve_media_root,
)
from nvila_ft.data.records import Record
from nvila_ft.data.subset import file_of, write_entries
from nvila_ft.data.validation import BadRecord

# Keys of a LLaVA record that hold media, in the order the official loader places them.
LLAVA_MEDIA_FIELDS = (("image", "image"), ("images", "image"), ("video", "video"), ("videos", "video"))


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
        self.on_error = check_on_error(on_error)
        self.errors: list[BadRecord] = []  # malformed records of the last records() call (on_error="collect")

    def records(self) -> list[Record]:
        self.errors = []
        root = resolve_media_root(self.media_root, Path(self.path).parent)
        return json_file_records(self, Path(self.path), self.path, lambda entry, origin, _: llava_record(entry, origin, root))

    def subset_files(self) -> list[SubsetFile]:
        return file_of(self, self.path, self.media_root)

    def write_subset(self, file: SubsetFile, indices: set[int], out: Path) -> WrittenSubset:
        return write_entries(file, indices, out)


def llava_record(entry: Any, origin: str, media_root: str) -> Record:
    """One LLaVA entry -> a Record (RecordProblem naming the field when it is malformed)."""
    if not isinstance(entry, dict):
        raise RecordProblem(f"expected a dict (a LLaVA record), got {type(entry).__name__}")
    counts = {"image": 0, "video": 0}
    for key, kind in LLAVA_MEDIA_FIELDS:
        value = entry.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) for item in items):
            raise RecordProblem(f"field {key!r}: expected a path or a list of paths, got {describe_value(value)}")
        counts[kind] += len(items)
    messages = llava_messages(entry, origin)
    return Record(
        messages=messages,
        origin=origin,
        id=optional_id(entry.get("id")),
        media_root=media_root,
        meta=media_meta(count_media_tags(entry), counts) | question_type_meta(entry),
    )


def llava_messages(entry: dict[str, Any], origin: str) -> list[dict[str, Any]]:
    """A LLaVA entry's conversation as chat messages (RecordProblem naming the field when it cannot be)."""
    try:
        return llava_to_messages(entry, where=origin)
    except ConversationError as e:
        # llava_to_messages names the field ('conversations', conversations[i].value, ...) after `where: `.
        raise RecordProblem(str(e).removeprefix(f"{origin}: ")) from e
