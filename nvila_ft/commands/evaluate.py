"""`nvila-ft evaluate`: generation metrics of a fine-tuned run (run=<dir>) or of a checkpoint (model.path=...)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nvila_ft.atomic import atomic_write_json
from nvila_ft.commands.common import build, cli_overrides, load_model, run_config, seed_everything, trained_adapters
from nvila_ft.training.evaluation import evaluate_records, write_jsonl


def evaluate(cfg: DictConfig) -> float | None:
    out_dir = Path(cfg.run_dir).absolute()
    adapters = None
    if cfg.run:
        run = Path(cfg.run).absolute()
        cfg = run_config(run, cli_overrides())
        adapters = trained_adapters(run)
        base_dir = run
    else:
        base_dir = out_dir
    precision, source, task = build(cfg.precision), build(cfg.model), build(cfg.task)
    precision.check()
    source.check()
    seed_everything(cfg.seed)
    loaded = load_model(source, base_dir, precision, adapters=adapters)
    records = task.load(cfg.seed).validation
    if cfg.eval.max_records:
        records = records[: cfg.eval.max_records]
    if not records:
        raise ValueError(f"task {task.name} has no validation records (set task.val_fraction or task.validation)")
    result = evaluate_records(loaded.model, loaded.processor, records, task.metrics, cfg.eval.batch_size, task.max_new_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", result.rows)
    atomic_write_json(
        out_dir / "metrics.json",
        {"task": task.name, "model": str(loaded.checkpoint), "adapters": str(adapters) if adapters else None,
         "records": len(records), "metrics": result.scores},
    )
    print(", ".join(f"{k} {v:.4f}" for k, v in result.scores.items()))
    print(f"predictions and metrics: {out_dir}")
    return result.scores.get(task.objective_metric)
