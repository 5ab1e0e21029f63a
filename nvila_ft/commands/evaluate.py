"""`nvila-ft evaluate`: generation metrics of a fine-tuned run (run=<dir>) or of a checkpoint (model.path=...)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nvila_ft.atomic import atomic_write_json
from nvila_ft.commands.common import build, log, run_config
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.validation import check_task_data
from nvila_ft.domains.baselines import baseline_scores, describe_baselines, describe_by_question_type, scores_by_question_type
from nvila_ft.metrics import format_scores
from nvila_ft.recipes.loading import load_model
from nvila_ft.recipes.rank_zero import RankZero
from nvila_ft.recipes.runs import BASE_DIR, seed_everything, trained_adapters
from nvila_ft.training.config import ConfigError
from nvila_ft.training.cpu_threads import set_cpu_threads
from nvila_ft.training.evaluation import evaluate_records, write_jsonl


def evaluate(cfg: DictConfig) -> float | None:
    out_dir = Path(cfg.run_dir).absolute()
    adapters = None
    if cfg.run:
        run = Path(cfg.run).absolute()
        cfg = run_config(run, cfg)
        adapters = trained_adapters(run)
        base_dir = run
    else:
        base_dir = out_dir
    precision, source, task = build(cfg, "precision"), build(cfg, "model"), build(cfg, "task")
    data_options, eval_options = build(cfg, "data"), build(cfg, "eval")
    precision.check(training=False)  # fp8 compute is for training; runs are evaluated in precision.weights
    source.check()
    set_cpu_threads(cfg.cpu_threads)
    seed_everything(cfg.seed)

    # the validation records are checked as finetune checks them: bad ones are listed and skipped
    data = task.load(cfg.seed)
    records = data.validation
    if data_options.validate:
        processor = NVILAProcessor.from_pretrained(source.checkpoint(base_dir / BASE_DIR), **data_options.processor_options())
        check = check_task_data(data, processor, progress=True, splits=("validation",))
        RankZero(out_dir).data_check(check, data_options.on_bad_record)
        records = check.validation.good
        if not records and check.validation.total:
            raise ConfigError(f"nothing to evaluate: {check.validation.why_empty('validation')}")
    records = eval_options.limit(records)
    if not records:
        raise ConfigError(f"task {task.name} has no validation records; give a validation file (task.validation=<path>) "
                          "or hold out part of the training data (task.val_fraction=0.1)")

    loaded = load_model(source, base_dir, precision, adapters=adapters, processor_options=data_options.processor_options())
    result = evaluate_records(loaded.model, loaded.processor, records, task.metrics, eval_options.batch_size, task.max_new_tokens)
    baselines = baseline_scores(data.train, records, task.metrics)
    by_type = scores_by_question_type(result.rows, task.objective_metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", result.rows)
    atomic_write_json(
        out_dir / "metrics.json",
        {"task": task.name, "model": str(loaded.checkpoint), "adapters": str(adapters) if adapters else None,
         "records": len(records), "metrics": result.scores, "metrics_by_question_type": by_type,
         "image_blind_baselines": baselines},
    )
    log.info("%s%s", format_scores(result.scores),
             describe_baselines(baselines, task.objective_metric))
    if by_type:
        log.info("by question type: %s", describe_by_question_type(by_type, task.objective_metric))
    log.info("predictions and metrics: %s", out_dir)
    return result.scores.get(task.objective_metric)
