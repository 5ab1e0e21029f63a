"""Write a subset of a task's training records in the layout of the files they came from.

Records carry `origin` = "<file>[<index>]" (nvila_ft.data.records), so the subset is copied from the original
entries, not re-serialised from Records. Each source says which files its records come from (`subset_files`) and
writes the kept entries of one of them in its own layout (`write_subset`); `write_entries` is what file sources
share: JSON list -> the same entries, unchanged, as a JSON list; JSON Lines -> the original lines; a table
(CSV/TSV) -> the header and the original rows (same delimiter). Each kept entry keeps its original order.
`check_subset_source` says up front whether a source can be written.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nvila_ft.atomic import atomic_write_bytes
from nvila_ft.data.kit import DataError, SubsetFile, WrittenSubset, is_json_lines, read_text


def origin_parts(origin: str) -> tuple[str, int]:
    """("data/train.json", 12) from "data/train.json[12]"."""
    prefix, bracket, rest = origin.rpartition("[")
    if not bracket or not rest.endswith("]") or not rest[:-1].isdigit():
        raise ValueError(f"{origin!r}: not a record origin of the form <file>[<index>]")
    return prefix, int(rest[:-1])


def subset_files(source: Any) -> list[SubsetFile]:
    """The files `source`'s records come from (`source.subset_files()`); DataError for a source that has none."""
    if not hasattr(source, "subset_files"):
        raise cannot_write(source)
    return source.subset_files()


def cannot_write(source: Any) -> DataError:
    """The error for a source no subset of which can be written (generated data, or a layout not copied back)."""
    return DataError(f"{getattr(source, 'path', None) or 'built-in data'}: cannot write a subset of a "
                     f"{type(source).__name__} source (supported: sources that read files, such as LlavaJson, "
                     "TableSource, HFDataset and the domain sources that read their datasets' files, and Mixtures of them)")


def write_subset(source: Any, origins: Iterable[str], out_dir: str | Path) -> list[WrittenSubset]:
    """Write the records named by `origins` (all read from `source`) into `out_dir`, one output per input file, named
    like it (with a numbered prefix when two inputs share a name). Inputs none of whose records is kept still get an
    (empty) output, so that a mixture's files stay in step."""
    wanted: dict[str, set[int]] = {}
    for origin in origins:
        prefix, index = origin_parts(origin)
        wanted.setdefault(prefix, set()).add(index)
    out_dir = Path(out_dir)
    written, names = [], set()
    for number, file in enumerate(subset_files(source)):
        name = f"{number}-{file.name}" if file.name in names else file.name
        names.add(name)
        written.append(file.source.write_subset(file, wanted.pop(file.prefix, set()), out_dir / name))
    if wanted:
        raise ValueError(f"origins of no source of this task: {sorted(wanted)}")
    return written


def check_subset_source(source: Any) -> None:
    """DataError now, before any work, when `write_subset` could not write a subset of `source`."""
    subset_files(source)


def write_entries(file: SubsetFile, indices: set[int], out: Path, delimiter: str | None = None) -> WrittenSubset:
    """The entries `indices` of a JSON list, JSON Lines file or (`delimiter` given) table, copied to `out` as written."""
    path = Path(file.prefix)
    text = read_text(path)
    if delimiter is None and is_json_lines(path, text):
        lines = [line for line in text.splitlines() if line.strip()]  # indices count non-blank lines, as the reader does
        kept = [line for i, line in enumerate(lines) if i in indices]
        atomic_write_bytes(out, "".join(line + "\n" for line in kept).encode())
        return WrittenSubset(file.prefix, out, len(kept), file.media_root, "json_lines")
    if delimiter is not None:
        rows = list(csv.reader(text.splitlines(keepends=True), delimiter=delimiter))
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
        writer.writerow(rows[0])
        kept = [row for i, row in enumerate(rows[1:]) if i in indices]
        writer.writerows(kept)
        atomic_write_bytes(out, buffer.getvalue().encode())
        return WrittenSubset(file.prefix, out, len(kept), file.media_root, "table")
    entries = json.loads(text)
    kept = [entry for i, entry in enumerate(entries) if i in indices]
    atomic_write_bytes(out, (json.dumps(kept, indent=2, ensure_ascii=False) + "\n").encode())
    return WrittenSubset(file.prefix, out, len(kept), file.media_root, "llava_json")


def file_of(source: Any, path: str, media_root: str | None = None) -> list[SubsetFile]:
    """The one input of a source that reads `path` with its media under `media_root` (default: the file's folder),
    named like the file."""
    folder = media_root if media_root is not None else Path(path).parent
    return [SubsetFile(path, str(Path(folder).resolve()), Path(path).name, source)]
