"""Built-in datasets as a task's data source: any domain's generator, by name (`GENERATORS` of the registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvila_ft.data.kit import SubsetFile, WrittenSubset
from nvila_ft.data.subset import file_of, write_entries
from nvila_ft.domains.registry import GENERATORS
from nvila_ft.domains.synthetic import builtin_folder


class BuiltinData:
    """A built-in dataset as a task's data source: generated once into a cache folder, then read by the same
    reader as user data (LLaVA JSON; preference JSON for preferences). `options` go to the generator (image_size,
    questions, frames, ...)."""

    def __init__(
        self,
        dataset: str = "shapes",
        num_records: int = 1000,
        seed: int = 0,
        cache_dir: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        if dataset not in GENERATORS:
            raise ValueError(f"unknown built-in dataset {dataset!r} (known: {', '.join(GENERATORS)})")
        self.dataset, self.num_records, self.seed = dataset, num_records, seed
        self.cache_dir, self.options = cache_dir, dict(options or {})
        self.errors: list[Any] = []

    def path(self) -> Path:
        """The dataset's data file, generated on first use."""
        folder = builtin_folder(self.dataset, self.num_records, self.seed, self.options, self.cache_dir)
        return GENERATORS[self.dataset].make(folder, self.num_records, seed=self.seed, **self.options)

    def records(self) -> list:
        source = GENERATORS[self.dataset].reader(str(self.path()))
        records = source.records()
        self.errors = source.errors
        return records

    def subset_files(self) -> list[SubsetFile]:
        """The generated data file (LLaVA JSON); its subset's media paths are relative to the cache folder."""
        return file_of(self, str(self.path()))

    def write_subset(self, file: SubsetFile, indices: set[int], out: Path) -> WrittenSubset:
        return write_entries(file, indices, out)
