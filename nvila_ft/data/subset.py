"""Write a subset of a task's training records in the layout of the files they came from.

Records carry `origin` = "<file>[<index>]" (nvila_ft.data.records), so the subset is copied from the original
entries, not re-serialised from Records: LLaVA JSON -> the same entries, unchanged, as a JSON list; JSON Lines ->
the original lines; CSV/TSV (PMC-VQA's too) -> the header and the original rows (same delimiter); a Hugging Face dataset
(nvila_ft.data.sources.HFDataset) -> the selected rows, as a saved dataset or data file of the input's kind. Each
kept entry keeps its original order. Built-in data is LLaVA JSON in a cache folder: its subset is LLaVA JSON whose
media paths are relative to that folder (returned as the file's media root). Medical VQA annotation files
(VQA-RAD, SLAKE JSON; PMC-VQA CSV; Hugging Face copies as HFDataset) and grounding files are copied the same way; their media root is the image
folder they were read with. `check_subset_source` says up front whether a source can be written.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvila_ft.atomic import atomic_write_bytes
from nvila_ft.data.sources import DataError, HFDataset, LlavaJson, Mixture, TableSource, _is_json_lines, _read_text


@dataclass(frozen=True)
class WrittenSubset:
    source: str  # the input file (or dataset folder) as records name it
    path: Path  # the file (or folder) written
    records: int  # entries written
    media_root: str | None  # where the written file's relative media paths resolve
    layout: str  # llava_json, json_lines, table, hf_saved, hf_files


def origin_parts(origin: str) -> tuple[str, int]:
    """("data/train.json", 12) from "data/train.json[12]"."""
    prefix, bracket, rest = origin.rpartition("[")
    if not bracket or not rest.endswith("]") or not rest[:-1].isdigit():
        raise ValueError(f"{origin!r}: not a record origin of the form <file>[<index>]")
    return prefix, int(rest[:-1])


def leaf_sources(source: Any) -> list[Any]:
    """The sources that read files: a Mixture's members, recursively; a MedicalVQA of a Hugging Face copy, its
    HFDataset; others as they are."""
    from nvila_ft.data.medical import MedicalVQA

    if isinstance(source, Mixture):
        return [leaf for member in source.sources for leaf in leaf_sources(member)]
    if isinstance(source, MedicalVQA) and source.reads_hugging_face():
        return [source.hugging_face_source()]  # its records are that HFDataset's rows, by their origins
    return [source]


def write_subset(source: Any, origins: Iterable[str], out_dir: str | Path) -> list[WrittenSubset]:
    """Write the records named by `origins` (all read from `source`) into `out_dir`, one output per input file, named
    like it (with a numbered prefix when two inputs share a name). Inputs none of whose records is kept still get an
    (empty) output, so that a mixture's files stay in step."""
    wanted: dict[str, set[int]] = {}
    for origin in origins:
        prefix, index = origin_parts(origin)
        wanted.setdefault(prefix, set()).add(index)
    out_dir = Path(out_dir)
    leaves = leaf_sources(source)
    written, names = [], set()
    for number, leaf in enumerate(leaves):
        prefix, media_root = _prefix_and_root(leaf)
        name = Path(prefix).name if not isinstance(leaf, HFDataset) else _hf_name(leaf)
        if name in names:
            name = f"{number}-{name}"
        names.add(name)
        indices = wanted.pop(prefix, set())
        written.append(_write_one(leaf, prefix, indices, out_dir / name, media_root))
    if wanted:
        raise ValueError(f"origins of no source of this task: {sorted(wanted)}")
    return written


def check_subset_source(source: Any) -> None:
    """DataError now, before any work, when `write_subset` could not write a subset of `source`."""
    for leaf in leaf_sources(source):
        _prefix_and_root(leaf)


def _prefix_and_root(leaf: Any) -> tuple[str, str | None]:
    from nvila_ft.data.builtin import BuiltinData
    from nvila_ft.data.medical import MedicalVQA
    from nvila_ft.data.referring import GroundingData

    if isinstance(leaf, MedicalVQA):
        return leaf.path, leaf.media_folder()
    if isinstance(leaf, GroundingData) and leaf.path is not None:
        root = leaf.media_root if leaf.media_root is not None else Path(leaf.path).parent
        return leaf.path, str(Path(root).resolve())
    if isinstance(leaf, BuiltinData):
        path = leaf.path()
        return str(path), str(path.parent.resolve())
    if isinstance(leaf, (LlavaJson, TableSource)):
        root = leaf.media_root if leaf.media_root is not None else Path(leaf.path).parent
        return leaf.path, str(Path(root).resolve())
    if isinstance(leaf, HFDataset):
        path = Path(leaf.path)
        if path.is_dir() and (path / "dataset_dict.json").is_file():
            split = leaf._pick_split(json.loads((path / "dataset_dict.json").read_text())["splits"])
            return str(path / split), str(Path(leaf.media_root or path).resolve())
        root = leaf.media_root or (path if path.is_dir() else path.parent)
        return leaf.path, str(Path(root).resolve())
    raise DataError(f"{getattr(leaf, 'path', None) or 'built-in data'}: cannot write a subset of a {type(leaf).__name__} "
                    "source (supported: LlavaJson and PreferenceJson, TableSource, HFDataset, BuiltinData, MedicalVQA, "
                    "GroundingData files, and Mixtures of them)")


def _hf_name(leaf: HFDataset) -> str:
    path = Path(leaf.path)
    if path.is_dir() or any(c in leaf.path for c in "*?["):
        return (path.name if path.is_dir() else path.parent.name or "data") + "-subset"
    return path.name


def _write_one(leaf: Any, prefix: str, indices: set[int], out: Path, media_root: str | None) -> WrittenSubset:
    if isinstance(leaf, HFDataset):
        return _write_hf(leaf, prefix, indices, out, media_root)
    file = Path(prefix)
    text = _read_text(file)
    suffix = file.suffix.lower()
    table = _is_table(leaf, suffix)
    if not table and _is_json_lines(file, text):
        lines = [line for line in text.splitlines() if line.strip()]  # indices count non-blank lines, as the reader does
        kept = [line for i, line in enumerate(lines) if i in indices]
        atomic_write_bytes(out, "".join(line + "\n" for line in kept).encode())
        return WrittenSubset(prefix, out, len(kept), media_root, "json_lines")
    if table:
        delimiter = getattr(leaf, "delimiter", None) or ("\t" if suffix in (".tsv", ".tab") else ",")
        rows = list(csv.reader(text.splitlines(keepends=True), delimiter=delimiter))
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
        writer.writerow(rows[0])
        kept = [row for i, row in enumerate(rows[1:]) if i in indices]
        writer.writerows(kept)
        atomic_write_bytes(out, buffer.getvalue().encode())
        return WrittenSubset(prefix, out, len(kept), media_root, "table")
    entries = json.loads(text)
    kept = [entry for i, entry in enumerate(entries) if i in indices]
    atomic_write_bytes(out, (json.dumps(kept, indent=2, ensure_ascii=False) + "\n").encode())
    return WrittenSubset(prefix, out, len(kept), media_root, "llava_json")


def _is_table(leaf: Any, suffix: str) -> bool:
    from nvila_ft.data.medical import MedicalVQA

    if isinstance(leaf, MedicalVQA):
        return leaf.layout == "pmc_vqa"
    return isinstance(leaf, TableSource) and suffix not in (".jsonl", ".ndjson", ".json")


def _write_hf(leaf: HFDataset, prefix: str, indices: set[int], out: Path, media_root: str | None) -> WrittenSubset:
    """The selected rows of a Hugging Face dataset: `save_to_disk` for a saved dataset, else a data file of the
    input's format (parquet, JSON Lines, CSV; arrow files as a saved dataset)."""
    from nvila_ft.atomic import atomic_directory

    dataset, _, _ = leaf._load()
    subset = dataset.select(sorted(indices))
    fmt = (leaf.data_format or Path(leaf.path).suffix).lower().lstrip(".")
    if Path(prefix).is_dir() or fmt in ("arrow", ""):
        with atomic_directory(out, overwrite=True) as staging:
            subset.save_to_disk(str(staging))
        return WrittenSubset(prefix, out, len(subset), media_root, "hf_saved")
    staging = out.with_name(f".{out.name}.partial")
    if fmt == "parquet":
        subset.to_parquet(str(staging))
    elif fmt == "csv":
        subset.to_csv(str(staging), index=False)
    else:
        subset.to_json(str(staging), lines=True, force_ascii=False)
    atomic_write_bytes(out, staging.read_bytes())
    staging.unlink()
    return WrittenSubset(prefix, out, len(subset), media_root, "hf_files")
