"""Scoring a task's answers with any metric a task may name: the generic ones and every domain's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nvila_ft import metrics
from nvila_ft.data.records import Record
from nvila_ft.domains.registry import METRICS


def compute_metrics(
    names: Sequence[str] | str,
    predictions: Sequence[str],
    references: Sequence[str],
    question_types: Sequence[str | None] | None = None,
    choices: Sequence[Mapping[str, str] | None] | None = None,
) -> dict[str, float]:
    """`nvila_ft.metrics.compute_metrics` over the full metric table (`nvila_ft.domains.registry.METRICS`)."""
    return metrics.compute_metrics(names, predictions, references, question_types, choices, table=METRICS)


def metric_context(records: Sequence[Record]) -> dict[str, list[Any]]:
    """What metrics may use beyond predictions and references: each record's question type and options."""
    return {"question_types": [r.question_type for r in records], "choices": [r.meta.get("choices") for r in records]}
