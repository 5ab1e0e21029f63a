"""Experiment tracking. `NoLogger` (default) never imports wandb; `WandbLogger` starts one W&B run per job.

The run is started before training so that the Trainer's own W&B callback (losses, learning rates, eval
metrics) logs into it; nvila-ft adds the resolved config, per-component trainable parameters, generation
metrics before/after training and a table of sample predictions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class NoLogger:
    report_to: list[str] = []

    def start(self, run_dir: str | Path, config: dict[str, Any], name: str | None = None) -> None:
        pass

    def log_summary(self, values: dict[str, Any]) -> None:
        pass

    def log_prediction_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class WandbLogger:
    project: str = "nvila-ft"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # offline | online | disabled
    log_predictions: int = 20

    report_to = ["wandb"]

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode = {self.mode!r}; use offline, online or disabled")
        self.tags = [str(t) for t in self.tags]
        self._run = None

    def start(self, run_dir: str | Path, config: dict[str, Any], name: str | None = None) -> None:
        import wandb

        os.environ["WANDB_MODE"] = self.mode  # also seen by the Trainer's callback
        os.environ.setdefault("WANDB_PROJECT", self.project)
        os.environ.setdefault("WANDB_SILENT", "true")
        if wandb.run is not None:  # a previous job of a sweep in the same process
            wandb.finish()
        self._run = wandb.init(
            project=self.project,
            entity=self.entity,
            name=self.name or name or Path(run_dir).name,
            tags=self.tags,
            mode=self.mode,
            dir=str(run_dir),
            config=config,
        )

    def log_summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(values)

    def log_prediction_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self._run is None or not rows or self.log_predictions <= 0:
            return
        import wandb

        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows[: self.log_predictions]])
        self._run.log({name: table})

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
