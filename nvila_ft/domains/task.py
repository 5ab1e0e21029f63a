"""A task: what to learn (data), how it is asked (prompt format) and how answers are scored (metrics)."""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nvila_ft.data.kit import split_records
from nvila_ft.data.llava import LlavaJson
from nvila_ft.data.records import Record
from nvila_ft.domains.registry import METRICS


@dataclass
class TaskData:
    train: list[Record]
    validation: list[Record]
    errors: list[Any] = field(default_factory=list)  # structural problems the sources found (BadRecord)


@dataclass
class Task:
    """train: a data source (an object with `records()`). validation: another source, or where to read one
    like `train` (a path, or a mapping of the train source's arguments such as {path, media_root}); when it is
    not given, `val_fraction` of `train` is held out (by seed). system_prompt / instruction are applied to
    every record, for training and evaluation alike; `objective` is the metric a sweep optimises (default:
    the first of `metrics`)."""

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
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"task.metrics: unknown {unknown} (known: {', '.join(METRICS)})")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"task.val_fraction = {self.val_fraction}: must be in [0, 1)")
        self.validation = validation_source(self.validation, self.train)

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

    @property
    def wants_validation(self) -> bool:
        """Whether evaluation was asked for: a validation source, or a share of train to hold out."""
        return self.validation is not None or self.val_fraction > 0

    def load(self, seed: int) -> TaskData:
        train = self.train.records()
        errors = list(getattr(self.train, "errors", []))
        if self.validation is not None:
            validation = self.validation.records()
            errors += list(getattr(self.validation, "errors", []))
        else:
            train, validation = split_records(train, self.val_fraction, seed)
        return TaskData([self.format(r) for r in train], [self.format(r) for r in validation], errors)


def validation_source(spec: Any, train: Any) -> Any | None:
    """The validation source a task config gives: a built source as is; a path, or a mapping of arguments
    ({path, media_root, ...}), read like `train` (same source type and options, other file); a mapping whose
    path is null means none (its other settings, e.g. a task's default validation `split`, wait for a path;
    a media_root without a path is an error). A train source without a `path` (built-in data) reads
    validation files as LLaVA JSON."""
    if spec is None or hasattr(spec, "records"):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": str(spec)}
    if not isinstance(spec, Mapping):
        raise ValueError(f"task.validation: expected a path or {{path, media_root}}, got {spec!r}")
    if spec.get("path") is None:
        if spec.get("media_root") is not None:
            raise ValueError("task.validation: set task.validation.path (the validation file) as well")
        return None
    like_train = "path" in inspect.signature(type(train)).parameters
    cls = type(train) if like_train else LlavaJson
    parameters = set(inspect.signature(cls).parameters)
    unknown = sorted(set(spec) - parameters)
    if unknown:
        raise ValueError(f"task.validation: {unknown} are not settings of {cls.__name__} (it takes {sorted(parameters)})")
    arguments = {name: getattr(train, name) for name in parameters if like_train and hasattr(train, name)}
    # the validation file's own media folder and all of its records; malformed ones are reported, not fatal
    arguments.update({k: v for k, v in (("media_root", None), ("limit", None), ("on_error", "collect")) if k in parameters})
    return cls(**{**arguments, **spec})
