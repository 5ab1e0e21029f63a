"""`nvila-ft finetune`: check everything, check the data, load, evaluate, train, evaluate again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from nvila_ft.adapters import format_report, trainable_report
from nvila_ft.adapters.artifacts import save_adapters
from nvila_ft.atomic import atomic_write_json
from nvila_ft.commands.plan import log_estimate
from nvila_ft.commands.common import (
    checkpoint_to_resume,
    BASE_DIR,
    FINAL_DIR,
    build,
    check_run,
    frozen_storage,
    load_model,
    log,
    plain,
    report_data_check,
    reset_accelerate,
    run_config,
    seed_everything,
)
from nvila_ft.data.dataset import Collator, ConversationDataset
from nvila_ft.data.packing import LengthGroupedSampler, PackedBatchSampler, PackingError
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.validation import check_task_data
from nvila_ft.domains.baselines import baseline_scores, describe_baselines, describe_by_question_type, scores_by_question_type
from nvila_ft.training.config import ConfigError, DataOptions
from nvila_ft.training.cpu_threads import set_cpu_threads
from nvila_ft.training.deepspeed import (
    end_distributed,
    ensure_single_process_env,
    gathered_parameters,
    is_main_process,
    join_deepspeed_comm,
    master_trainable_state,
)
from nvila_ft.training.evaluation import evaluate_records, write_jsonl
from nvila_ft.training.fp8 import convert_llm_to_float8
from nvila_ft.metrics import format_scores
from nvila_ft.training.plots import plot_history
from nvila_ft.training.trainer import build_trainer

def finetune(cfg: DictConfig) -> float | None:
    """Returns the task's objective metric after training (what a sweep optimises)."""
    reset_accelerate()
    if cfg.run:  # continue a run: its own configuration, with this command's overrides on top
        cfg = run_config(cfg.run, cfg)
    run_dir = Path(cfg.run or cfg.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)

    # 1. every config object is built and checked before anything heavy happens
    policy, precision, trainer_config = build(cfg, "adapters"), build(cfg, "precision"), build(cfg, "trainer")
    deepspeed, logger, source, task = build(cfg, "deepspeed"), build(cfg, "logger"), build(cfg, "model"), build(cfg, "task")
    data_options, eval_options = build(cfg, "data"), build(cfg, "eval")
    if policy is None:
        raise ConfigError("finetune needs an adapter policy (adapters=<preset>); adapters=none trains nothing")
    check_run(policy, precision, trainer_config, deepspeed)
    precision.check_device()
    source.check()
    resume = checkpoint_to_resume(run_dir) if trainer_config.resume else None
    set_cpu_threads(cfg.cpu_threads)
    seed_everything(cfg.seed)
    if deepspeed.enabled:
        ensure_single_process_env()

    # 2. data, checked before any weight loads: every record goes through the processor (media, answer, length);
    # bad ones are skipped or refuse the run, never silently, and evaluation is decided from what is left
    processor = NVILAProcessor.from_pretrained(source.checkpoint(run_dir / BASE_DIR), **data_options.processor_options())
    data = task.load(cfg.seed)
    train, validation = data.train, data.validation
    check = None
    if data_options.validate:
        check = check_task_data(data, processor, progress=True)
        report_data_check(check, run_dir / "data_report.txt", data_options.on_bad_record)
        train, validation = check.train.good, check.validation.good
    if not train:
        raise ConfigError("no usable training record: " + (check.train.why_empty("training") if check else "the training data is empty"))
    if not validation and task.wants_validation:
        why = check.validation.why_empty("validation") if check and check.validation.total else (
            "task.val_fraction held out no record" if task.validation is None else "the validation data is empty")
        if eval_options.on_empty == "stop":
            raise ConfigError(f"no usable validation record: {why}. Fix the validation data, or set eval.on_empty=train to train without evaluation")
        log.warning("no usable validation record (%s); training without evaluation (eval.on_empty=train)", why)

    if is_main_process():
        log_estimate(policy, precision, trainer_config, deepspeed, data_options, train, processor, build(cfg, "plan"), cfg.seed)

    # 3. training arguments first: with ZeRO-3 they must exist before the model is loaded
    args = trainer_config.training_arguments(
        run_dir, precision, cfg.seed, has_eval=bool(validation), report_to=logger.report_to,
        deepspeed=deepspeed.to_dict() if deepspeed.enabled else None,
    )
    if deepspeed.enabled:
        join_deepspeed_comm()
    loaded = load_model(source, run_dir, precision, policy=policy, processor_options=data_options.processor_options(),
                        storage=frozen_storage(precision, trainer_config))
    model, processor = loaded.model, loaded.processor
    if precision.fp8:
        conversion = convert_llm_to_float8(model, precision.fp8)
        log.info("%s; kept in %s: %s", conversion.summary(), precision.weights,
                 ", ".join(f"{name} ({why})" for name, why in conversion.kept.items()) or "none")
        if is_main_process():
            conversion.write(run_dir)
    report = trainable_report(model)
    log.info("adapter policy %s\n%s", policy.name or "", format_report(report))

    if is_main_process():  # one W&B run for the whole job
        logger.start(run_dir, plain(cfg), name=run_dir.name)
    logger.log_summary({f"trainable/{r.component}": r.trainable for r in report} | {"trainable/total": sum(r.trainable for r in report)})
    eval_records = eval_options.limit(validation)
    baselines = baseline_scores(train, eval_records, task.metrics)
    metrics: dict[str, dict[str, float]] = {}
    by_type: dict[str, dict[str, dict[str, float]]] = {}

    def evaluate(stage: str) -> None:
        if not eval_records:
            return
        with gathered_parameters(model):  # every process takes part when ZeRO-3 shards the weights
            result = evaluate_records(model, processor, eval_records, task.metrics, eval_options.batch_size, task.max_new_tokens)
        metrics[stage] = result.scores
        by_type[stage] = scores_by_question_type(result.rows, task.objective_metric)
        if not is_main_process():
            return
        write_jsonl(run_dir / f"predictions_{stage}.jsonl", result.rows)
        logger.log_summary({f"{stage}/{k}": v for k, v in result.scores.items()})
        logger.log_prediction_table(f"predictions_{stage}", result.rows)
        log.info("%s: %s", stage, format_scores(result.scores))
        if by_type[stage]:
            log.info("  by question type: %s", describe_by_question_type(by_type[stage], task.objective_metric))

    if eval_options.before_training and resume is None:
        evaluate("before_training")

    # 4. train, with the memory levers of trainer.* (none changes what is learned)
    model.selective_loss = trainer_config.selective_loss
    if trainer_config.checkpointed_components():
        model.activation_checkpointing_enable(components=trainer_config.checkpointed_components())
    eval_dataset = ConversationDataset(validation, processor) if validation else None
    sampler = train_sampler(data_options, train, check.train.lengths if check else [], trainer_config.per_device_train_batch_size, cfg.seed)
    collator = Collator(processor, max_tokens=data_options.max_tokens if data_options.packing else None)
    trainer = build_trainer(model, args, ConversationDataset(train, processor), eval_dataset, collator, train_sampler=sampler,
                            offload_activations=trainer_config.offload_activations, eval_collator=Collator(processor))
    result = trainer.train(resume_from_checkpoint=resume)
    # under DeepSpeed the trained values are its float32 master copies, gathered by every process
    trained = master_trainable_state(model, keep=is_main_process()) if deepspeed.enabled else None
    if is_main_process():
        save_adapters(model, run_dir / FINAL_DIR, overwrite=True, extra={"task": task.name}, state_dict=trained)
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
        "metrics_by_question_type": by_type,
        "image_blind_baselines": baselines,
    }
    if is_main_process():
        atomic_write_json(run_dir / "metrics.json", summary)
    logger.log_summary({f"baseline/{name}/{k}": v for name, scores in baselines.items() for k, v in scores.items()})
    logger.finish()
    objective = task.objective_metric
    if "after_training" in metrics:
        before = f"{metrics['before_training'][objective]:.3f} before -> " if "before_training" in metrics else ""
        log.info("\n%s: %s %s%.3f after training%s", task.name, objective, before, metrics["after_training"][objective],
                 describe_baselines(baselines, objective))
    log.info("run directory: %s", run_dir)
    end_distributed()
    return metrics.get("after_training", {}).get(objective)



def train_sampler(options: DataOptions, records: list, lengths: list[int], batch_size: int, seed: int) -> Any:
    """Micro-batches of `batch_size` packed rows of up to `data.max_tokens` positions (data.packing), batches of one
    modality and similar length (data.group_by_length), or None (the Trainer's shuffled order)."""
    if options.packing:
        try:
            sampler = PackedBatchSampler(lengths, options.max_tokens, batch_size, seed, [r.name for r in records])
        except PackingError as err:
            raise ConfigError(str(err)) from err
        log.info("packing: %d samples into %d rows of up to %d positions (%.0f%% left empty), %d rows per micro-batch",
                 len(records), len(sampler.packs), options.max_tokens, 100 * sampler.empty_share, batch_size)
        return sampler
    if options.group_by_length:
        return LengthGroupedSampler(lengths, [r.modality for r in records], batch_size, seed)
    return None
