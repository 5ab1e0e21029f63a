"""`nvila-ft finetune`: check everything, load, validate the data, evaluate, train, evaluate again."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from nvila_ft.adapters import format_report, trainable_report
from nvila_ft.adapters.artifacts import save_adapters
from nvila_ft.atomic import atomic_write_json
from nvila_ft.commands.common import (
    FINAL_DIR,
    build,
    cli_overrides,
    load_model,
    log,
    plain,
    reset_accelerate,
    run_config,
    seed_everything,
)
from nvila_ft.data.dataset import Collator, ConversationDataset
from nvila_ft.data.validation import check_task_data
from nvila_ft.training.config import ConfigError
from nvila_ft.training.deepspeed import ensure_single_process_env, gathered_parameters, is_main_process
from nvila_ft.training.evaluation import evaluate_records, write_jsonl
from nvila_ft.training.plots import plot_history
from nvila_ft.training.trainer import build_trainer, complete_checkpoints, remove_incomplete_checkpoints


def finetune(cfg: DictConfig) -> float | None:
    """Returns the task's objective metric after training (what a sweep optimises)."""
    reset_accelerate()
    if cfg.run:  # continue a run: its own configuration, with this command's overrides on top
        cfg = run_config(cfg.run, cli_overrides())
    run_dir = Path(cfg.run or cfg.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)

    # 1. every config object is built and checked before anything heavy happens
    policy, precision, trainer_config = build(cfg.adapters), build(cfg.precision), build(cfg.trainer)
    deepspeed, logger, source, task = build(cfg.deepspeed), build(cfg.logger), build(cfg.model), build(cfg.task)
    if policy is None:
        raise ConfigError("finetune needs an adapter policy (adapters=<preset>); adapters=none trains nothing")
    policy.check()
    precision.check()
    trainer_config.check()
    deepspeed.check(policy, precision)
    source.check()
    if cfg.data.on_bad_record not in ("skip", "stop"):
        raise ConfigError(f"data.on_bad_record = {cfg.data.on_bad_record!r}; use skip or stop")
    resume = None
    if trainer_config.resume:
        removed = remove_incomplete_checkpoints(run_dir)
        for folder in removed:
            log.warning("removed %s: the run was stopped while it was being written", folder)
        checkpoints = complete_checkpoints(run_dir)
        if not checkpoints:
            raise ConfigError(f"trainer.resume=true but {run_dir} has no complete checkpoint to resume from")
        resume = str(checkpoints[-1])
    seed_everything(cfg.seed)
    if deepspeed.enabled:
        ensure_single_process_env()

    # 2. training arguments first: with ZeRO-3 they must exist before the model is loaded
    data = task.load(cfg.seed)
    args = trainer_config.training_arguments(
        run_dir, precision, cfg.seed, has_eval=bool(data.validation), report_to=logger.report_to,
        deepspeed=deepspeed.to_dict() if deepspeed.enabled else None,
    )
    loaded = load_model(source, run_dir, precision, policy=policy)
    model, processor = loaded.model, loaded.processor
    report = trainable_report(model)
    print(f"\nadapter policy {policy.name or ''}\n{format_report(report)}\n", flush=True)

    # 3. data: every record is checked (media, answer, length) and bad ones skipped or refused, never silently
    train, validation = data.train, data.validation
    if cfg.data.validate:
        check = check_task_data(data, processor)
        (run_dir / "data_report.txt").write_text(check.text())
        print("\n".join(check.summaries()), flush=True)
        if check.bad:
            lines = [b.line() for b in check.bad]
            print("\n".join(lines[:20]) + (f"\n... ({len(lines) - 20} more in data_report.txt)" if len(lines) > 20 else ""))
            if cfg.data.on_bad_record == "stop":
                raise ConfigError(f"{len(check.bad)} bad records (data.on_bad_record=stop); see {run_dir / 'data_report.txt'}")
        train, validation = check.train.good, check.validation.good
    if not train:
        raise ConfigError("no usable training record")

    logger.start(run_dir, plain(cfg), name=run_dir.name)
    logger.log_summary({f"trainable/{r.component}": r.trainable for r in report} | {"trainable/total": sum(r.trainable for r in report)})
    eval_records = validation[: cfg.eval.max_records] if cfg.eval.max_records else validation
    metrics: dict[str, dict[str, float]] = {}

    def evaluate(stage: str) -> None:
        if not eval_records:
            return
        with gathered_parameters(model):  # every process takes part when ZeRO-3 shards the weights
            result = evaluate_records(model, processor, eval_records, task.metrics, cfg.eval.batch_size, task.max_new_tokens)
        metrics[stage] = result.scores
        if not is_main_process():
            return
        write_jsonl(run_dir / f"predictions_{stage}.jsonl", result.rows)
        logger.log_summary({f"{stage}/{k}": v for k, v in result.scores.items()})
        logger.log_prediction_table(f"predictions_{stage}", result.rows)
        print(f"{stage}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.scores.items()), flush=True)

    if cfg.eval.before_training and resume is None:
        evaluate("before_training")

    # 4. train
    eval_dataset = ConversationDataset(validation, processor) if validation else None
    trainer = build_trainer(model, args, ConversationDataset(train, processor), eval_dataset, Collator(processor))
    result = trainer.train(resume_from_checkpoint=resume)
    with gathered_parameters(model):
        if is_main_process():
            save_adapters(model, run_dir / FINAL_DIR, overwrite=True, extra={"task": task.name})
    plot_history(trainer.state.log_history, run_dir / "training_curve.png", title=f"{task.name} / {policy.name or 'policy'}")
    evaluate("after_training")

    summary = {
        "task": task.name,
        "policy": policy.name,
        "train_records": len(train),
        "validation_records": len(validation),
        "steps": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_loss": result.metrics.get("train_loss"),
        "trainable_parameters": {r.component: r.trainable for r in report},
        "metrics": metrics,
        "chance_accuracy": _chance(task),
    }
    atomic_write_json(run_dir / "metrics.json", summary)
    logger.finish()
    if "before_training" in metrics and "after_training" in metrics:
        objective = task.objective_metric
        print(
            f"\n{task.name}: {objective} {metrics['before_training'][objective]:.3f} before -> "
            f"{metrics['after_training'][objective]:.3f} after training"
            + (f" (chance {summary['chance_accuracy']:.3f})" if summary["chance_accuracy"] is not None else "")
        )
    print(f"run directory: {run_dir}", flush=True)
    return metrics.get("after_training", {}).get(task.objective_metric)


def _chance(task) -> float | None:
    """Chance-level accuracy of a built-in task (known answer sets); None for user data."""
    path_of = getattr(task.train, "path", None)
    if task.train.__class__.__name__ != "BuiltinData" or path_of is None:
        return None
    from nvila_ft.data.builtin import chance_accuracy

    return chance_accuracy(path_of())
