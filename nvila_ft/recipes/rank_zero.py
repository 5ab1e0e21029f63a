"""What only the main process of a run does: in a launch of several processes every process computes the same
run, and the main one (rank 0) alone writes the run's files, talks to W&B, logs what is said once, plans the
memory and saves the adapters. Each such action is a method of `RankZero`; nothing else in the recipes asks
which process it runs in."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nvila_ft.adapters.artifacts import save_adapters
from nvila_ft.adapters.policy import AdapterPolicy
from nvila_ft.atomic import atomic_write_json
from nvila_ft.data.validation import TaskDataCheck
from nvila_ft.metrics import format_scores
from nvila_ft.training.config import ConfigError
from nvila_ft.training.deepspeed import is_main_process
from nvila_ft.training.evaluation import write_jsonl
from nvila_ft.training.planning import log_estimate
from nvila_ft.training.plots import plot_history
from nvila_ft.training.trainer import remove_incomplete_checkpoints
from nvila_ft.training.wandb_logger import NoLogger

log = logging.getLogger("nvila_ft")
DATA_REPORT = "data_report.txt"


def _rank_zero_only(action: Callable[..., None]) -> Callable[..., None]:
    """The action runs on the main process; on the others it does nothing."""

    @functools.wraps(action)
    def on_rank_zero(self: RankZero, *args: Any, **kwargs: Any) -> None:
        if self.active:
            action(self, *args, **kwargs)

    return on_rank_zero


class RankZero:
    """The main process's actions on a run directory (`run_dir`) and its experiment logger."""

    def __init__(self, run_dir: Path, logger: Any = None) -> None:
        self.run_dir = run_dir
        self.logger = logger if logger is not None else NoLogger()
        self.active = is_main_process()

    @_rank_zero_only
    def info(self, message: str, *args: Any) -> None:
        log.info(message, *args)

    @_rank_zero_only
    def remove_incomplete_checkpoints(self) -> None:
        """The folders a stop left half-written (one process removes them, or they race over the same files)."""
        for folder in remove_incomplete_checkpoints(self.run_dir):
            log.warning("removed %s: the run was stopped while it was being written", folder)

    def data_check(self, check: TaskDataCheck, on_bad_record: str) -> None:
        """Report a data check (main process); every process stops when records are bad and data.on_bad_record=stop."""
        self.report_data(check)
        if check.bad and on_bad_record == "stop":
            raise ConfigError(f"{len(check.bad)} bad records (data.on_bad_record=stop); see {self.run_dir / DATA_REPORT}")

    @_rank_zero_only
    def report_data(self, check: TaskDataCheck) -> None:
        """The data report; the summaries and the first 20 bad records on the console. In a distributed run every
        process checked the same records; the first one reports."""
        report_file = self.run_dir / DATA_REPORT
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(check.text())
        log.info("\n".join(check.summaries()))
        if check.bad:
            lines = [b.line() for b in check.bad]
            more = f"\n... ({len(lines) - 20} more in {report_file})" if len(lines) > 20 else ""
            log.warning("%d bad records, skipped:\n%s%s", len(lines), "\n".join(lines[:20]), more)

    @_rank_zero_only
    def log_estimate(self, *args: Any) -> None:
        """The run's planned GPU memory in one line (`nvila_ft.training.planning.log_estimate`'s arguments)."""
        log_estimate(*args)

    @_rank_zero_only
    def write_float8_conversion(self, conversion: Any) -> None:
        conversion.write(self.run_dir)

    @_rank_zero_only
    def start_logger(self, config: dict[str, Any]) -> None:
        """One W&B run for the whole job."""
        self.logger.start(self.run_dir, config, name=self.run_dir.name)

    @_rank_zero_only
    def evaluation(self, stage: str, scores: dict[str, float], rows: list[dict[str, Any]]) -> None:
        """`predictions_<stage>.jsonl`, the scores in W&B's summary and on the console."""
        write_jsonl(self.run_dir / f"predictions_{stage}.jsonl", rows)
        self.logger.log_summary({f"{stage}/{k}": v for k, v in scores.items()})
        log.info("%s: %s", stage, format_scores(scores))

    @_rank_zero_only
    def prediction_table(self, stage: str, rows: list[dict[str, Any]]) -> None:
        self.logger.log_prediction_table(f"predictions_{stage}", rows)

    @_rank_zero_only
    def save_final(self, model: Any, policy: AdapterPolicy, folder: str, extra: dict[str, Any],
                   state_dict: dict[str, Any] | None, history: list[dict[str, Any]], title: str) -> None:
        """The trained adapters (`<run_dir>/<folder>`) and the training curve."""
        save_adapters(model, policy, self.run_dir / folder, overwrite=True, extra=extra, state_dict=state_dict)
        plot_history(history, self.run_dir / "training_curve.png", title=title)

    @_rank_zero_only
    def write_metrics(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.run_dir / "metrics.json", summary)
