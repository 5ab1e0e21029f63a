"""Several sources read as one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nvila_ft.data.kit import DataError, SubsetFile
from nvila_ft.data.records import Record
from nvila_ft.data.subset import subset_files
from nvila_ft.data.validation import BadRecord


class Mixture:
    """Several sources read as one: their records one after another, in the order given (training shuffles).

        train:
          _target_: nvila_ft.data.mixture.Mixture
          sources:
            - {_target_: nvila_ft.data.llava.LlavaJson, path: /data/a.json}
            - {_target_: nvila_ft.data.tables.TableSource, path: /data/b.csv}
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

    def subset_files(self) -> list[SubsetFile]:
        return [file for source in self.sources for file in subset_files(source)]


