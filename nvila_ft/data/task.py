"""A task: what to learn (data), how it is asked (prompt format) and how answers are scored (metrics)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from nvila_ft.data.records import Record
from nvila_ft.data.sources import split_records


@dataclass
class TaskData:
    train: list[Record]
    validation: list[Record]
    errors: list[Any] = field(default_factory=list)  # structural problems the sources found (BadRecord)


@dataclass
class Task:
    """train / validation: data sources (objects with `records()`); without `validation`, `val_fraction` of
    `train` is held out (by seed). system_prompt / instruction are applied to every record, for training and
    evaluation alike; `objective` is the metric a sweep optimises (default: the first of `metrics`)."""

    name: str
    train: Any
    validation: Any | None = None
    val_fraction: float = 0.1
    metrics: list[str] = field(default_factory=lambda: ["exact_match"])
    objective: str | None = None
    max_new_tokens: int = 32
    system_prompt: str | None = None
    instruction: str | None = None

    def __post_init__(self) -> None:
        self.metrics = [str(m) for m in ([self.metrics] if isinstance(self.metrics, str) else self.metrics)]
        from nvila_ft.training.metrics import METRICS

        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"task.metrics: unknown {unknown} (known: {', '.join(METRICS)})")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"task.val_fraction = {self.val_fraction}: must be in [0, 1)")

    @property
    def objective_metric(self) -> str:
        return self.objective or self.metrics[0]

    def format(self, record: Record) -> Record:
        """The record with the task's system prompt and instruction applied."""
        if not self.system_prompt and not self.instruction:
            return record
        messages = copy.deepcopy(record.messages)
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if self.instruction:
            first_user = next((m for m in messages if m.get("role") in ("user", "human")), None)
            if first_user is not None:
                content = first_user.get("content")
                if isinstance(content, str):
                    first_user["content"] = f"{content}\n{self.instruction}".strip()
                else:
                    first_user["content"] = list(content) + [{"type": "text", "text": "\n" + self.instruction}]
        return Record(messages, record.origin, record.id, record.media_root, dict(record.meta))

    def load(self, seed: int) -> TaskData:
        train = self.train.records()
        errors = list(getattr(self.train, "errors", []))
        if self.validation is not None:
            validation = self.validation.records()
            errors += list(getattr(self.validation, "errors", []))
        else:
            train, validation = split_records(train, self.val_fraction, seed)
        return TaskData([self.format(r) for r in train], [self.format(r) for r in validation], errors)
