"""`nvila-ft validate-data`: report every bad record of a task's data (file, index, reason), then a summary."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nvila_ft.commands.common import build, log
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.validation import check_task_data
from nvila_ft.recipes.runs import BASE_DIR
from nvila_ft.training.cpu_threads import set_cpu_threads


def validate_data(cfg: DictConfig) -> int:
    """Returns the number of bad records (the CLI exits with 1 when there are any)."""
    out_dir = Path(cfg.run_dir).absolute()
    source, task = build(cfg, "model"), build(cfg, "task")
    source.check()
    set_cpu_threads(cfg.cpu_threads)
    processor = NVILAProcessor.from_pretrained(source.checkpoint(out_dir / BASE_DIR), **build(cfg, "data").processor_options())
    check = check_task_data(task.load(cfg.seed), processor, progress=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data_report.txt").write_text(check.text())
    log.info("%s", check.text().rstrip("\n"))
    log.info("report: %s", out_dir / "data_report.txt")
    return len(check.bad)
