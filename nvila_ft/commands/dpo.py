"""`nvila-ft dpo`: preference tuning (DPO, IPO, ... from TRL) of a model with an adapter policy, on a preference
task; the run directory has finetune's layout, so `evaluate run=` and `export run=` work on it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import DictConfig

from nvila_ft.adapters import format_report, trainable_report
from nvila_ft.adapters.artifacts import save_adapters
from nvila_ft.atomic import atomic_write_json
from nvila_ft.commands.common import (
    checkpoint_to_resume,
    FINAL_DIR,
    BASE_DIR,
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
from nvila_ft.domains.preference.sources import REJECTED
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.validation import check_task_data
from nvila_ft.metrics import format_scores
from nvila_ft.training.config import ConfigError
from nvila_ft.training.cpu_threads import set_cpu_threads
from nvila_ft.training.evaluation import evaluate_records, write_jsonl
from nvila_ft.training.plots import plot_history

# TRL 1.16's DPOTrainer losses (`DPOConfig.loss_type`)
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# the loss types whose TRL 1.16 formula uses DPOConfig.label_smoothing
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
# the reward metrics TRL logs, reported at the start and the end of training
REWARD_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")


@dataclass
class DPOOptions:
    """The `dpo:` section: TRL's `DPOConfig` preference settings.

    beta: strength of the pull towards the reference (DPO's beta; IPO's tau). loss_type: one of LOSS_TYPES, or a
    list of them combined with `loss_weights`. label_smoothing: the assumed share of flipped labels, which TRL 1.16
    reads only in the loss types of SMOOTHED_LOSSES (robust: in [0, 0.5); exo_pair: > 0; aot, aot_unpaired); its
    "sigmoid" loss ignores it (no cDPO there), so a non-zero value with none of those is refused rather than
    silently unused. disable_dropout: dropout off in policy and reference (TRL's default).
    """

    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    disable_dropout: bool = True
    extra: dict = field(default_factory=dict)  # any other trl.DPOConfig field (f_divergence_type, ld_alpha, ...)

    def __post_init__(self) -> None:
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unknown = [t for t in types if t not in LOSS_TYPES]
        if not types or unknown:
            raise ConfigError(f"dpo.loss_type = {self.loss_type!r}: use one (or a list) of {', '.join(LOSS_TYPES)}")
        if not math.isfinite(self.beta) or self.beta <= 0:
            raise ConfigError(f"dpo.beta = {self.beta}: must be a finite number > 0")
        owned = sorted(set(self.extra) & ({f.name for f in fields(self)} - {"extra"}))
        if owned:
            raise ConfigError(f"dpo.extra sets {owned}, which are dpo options of their own; set dpo.{owned[0]}=... "
                              "instead (so that they are checked)")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ConfigError(f"dpo.loss_weights: {len(self.loss_weights)} weights for {len(types)} loss types")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"dpo.label_smoothing = {self.label_smoothing}: must be in [0, 1)")
        if "exo_pair" in types and self.label_smoothing == 0:
            raise ConfigError("dpo.loss_type exo_pair needs dpo.label_smoothing > 0 (the EXO paper uses 1e-3)")
        if "robust" in types and self.label_smoothing >= 0.5:
            raise ConfigError(f"dpo.label_smoothing = {self.label_smoothing}: the robust loss needs it in [0, 0.5)")
        if self.label_smoothing and not set(types) & set(SMOOTHED_LOSSES):
            raise ConfigError(f"dpo.label_smoothing = {self.label_smoothing} is unused by loss_type {types} (TRL reads it "
                              f"only in {', '.join(SMOOTHED_LOSSES)}; for noisy preferences use robust, rDPO)")
        self.loss_type = types

    def config_arguments(self) -> dict:
        """The `trl.DPOConfig` arguments these options set."""
        return {"beta": self.beta, "loss_type": self.loss_type, "loss_weights": self.loss_weights,
                "label_smoothing": self.label_smoothing, "disable_dropout": self.disable_dropout,
                # the collator truncates (model_max_length); checkpointing is per component, set on the model
                "max_length": None, "activation_checkpointing": False, **self.extra}


def dpo(cfg: DictConfig) -> float | None:
    """Returns the last logged rewards/margins (what a sweep would maximise)."""
    from trl import DPOConfig

    from nvila_ft.training.preference import build_dpo_trainer, check_reference_policy, check_rejected

    reset_accelerate()
    if cfg.run:
        cfg = run_config(cfg.run, cfg)
    run_dir = Path(cfg.run or cfg.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)

    # 1. every config object is built and checked before anything heavy happens
    policy, precision, trainer_config = build(cfg, "adapters"), build(cfg, "precision"), build(cfg, "trainer")
    deepspeed, logger, source, task = build(cfg, "deepspeed"), build(cfg, "logger"), build(cfg, "model"), build(cfg, "task")
    data_options, eval_options, options = build(cfg, "data"), build(cfg, "eval"), build(cfg, "dpo")
    if policy is None:
        raise ConfigError("dpo needs an adapter policy (adapters=<preset>); adapters=none trains nothing")
    check_run(policy, precision, trainer_config, deepspeed)
    check_reference_policy(policy)
    if deepspeed.enabled:
        raise ConfigError("dpo runs in one process without DeepSpeed; use deepspeed=none (and a quantized base, "
                          "adapters=ln_vit_qlora_llm, for less memory)")
    if precision.fp8:
        raise ConfigError("dpo: precision.fp8 is for finetune; use precision=bf16")
    if data_options.packing or data_options.group_by_length:
        raise ConfigError("dpo batches each pair's two replies together; set data.packing=false and data.group_by_length=false")
    source.check()
    resume = checkpoint_to_resume(run_dir) if trainer_config.resume else None
    set_cpu_threads(cfg.cpu_threads)
    seed_everything(cfg.seed)

    # 2. data: preference records only; both conversations of each pair checked before any weight loads
    processor = NVILAProcessor.from_pretrained(source.checkpoint(run_dir / BASE_DIR), **data_options.processor_options())
    data = task.load(cfg.seed)
    not_pairs = [r.origin for r in data.train + data.validation if REJECTED not in r.meta]
    if not_pairs:
        raise ConfigError(f"dpo needs preference records (chosen and rejected replies); {not_pairs[0]} has no rejected "
                          "reply. Use a preference task: task=preference task.train.path=<file>, or task=demo_preference")
    train, validation = data.train, data.validation
    if data_options.validate:
        check = check_task_data(data, processor, progress=True)
        train, bad_train = check_rejected(check.train.good, processor)
        validation, bad_validation = check_rejected(check.validation.good, processor)
        check.bad += bad_train + bad_validation
        check.train.bad += bad_train
        check.validation.bad += bad_validation
        report_data_check(check, run_dir / "data_report.txt", data_options.on_bad_record)
    if not train:
        raise ConfigError("no usable preference record for training; see data_report.txt in the run directory")

    args = trainer_config.training_arguments(
        run_dir, precision, cfg.seed, has_eval=bool(validation), report_to=logger.report_to,
        arguments_class=DPOConfig, **options.config_arguments(),
    )
    loaded = load_model(source, run_dir, precision, policy=policy, processor_options=data_options.processor_options(),
                        storage=frozen_storage(precision, trainer_config))
    model, processor = loaded.model, loaded.processor
    report = trainable_report(model)
    log.info("adapter policy %s\n%s", policy.name or "", format_report(report))
    logger.start(run_dir, plain(cfg), name=run_dir.name)
    eval_records = eval_options.limit(validation)
    metrics: dict[str, dict[str, float]] = {}

    def evaluate(stage: str) -> None:
        """Generation against the chosen replies, as finetune evaluates."""
        if not eval_records:
            return
        result = evaluate_records(model, processor, eval_records, task.metrics, eval_options.batch_size, task.max_new_tokens)
        metrics[stage] = result.scores
        write_jsonl(run_dir / f"predictions_{stage}.jsonl", result.rows)
        logger.log_summary({f"{stage}/{k}": v for k, v in result.scores.items()})
        log.info("%s: %s", stage, format_scores(result.scores))

    if eval_options.before_training and resume is None:
        evaluate("before_training")

    # 3. preference tuning: TRL's loss against the reference (this model, adapters disabled)
    model.selective_loss = False  # TRL projects the reply positions through lm_head itself
    if trainer_config.checkpointed_components():
        model.activation_checkpointing_enable(components=trainer_config.checkpointed_components())
    trainer = build_dpo_trainer(model, args, train, validation, processor, offload_activations=trainer_config.offload_activations)
    result = trainer.train(resume_from_checkpoint=resume)
    save_adapters(model, run_dir / FINAL_DIR, overwrite=True, extra={"task": task.name, "method": "dpo"})
    plot_history(trainer.state.log_history, run_dir / "training_curve.png", title=f"{task.name} / {policy.name or 'policy'} / dpo")
    evaluate("after_training")

    rewards = reward_trend(trainer.state.log_history)
    summary = {
        "task": task.name,
        "policy": policy.name,
        "method": "dpo",
        "loss_type": options.loss_type,
        "beta": options.beta,
        "train_records": len(train),
        "validation_records": len(validation),
        "steps": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_loss": result.metrics.get("train_loss"),
        "trainable_parameters": {r.component: r.trainable for r in report},
        "rewards": rewards,
        "metrics": metrics,
    }
    atomic_write_json(run_dir / "metrics.json", summary)
    logger.log_summary({f"rewards/{stage}/{k}": v for stage, values in rewards.items() for k, v in values.items()})
    logger.finish()
    if rewards:
        log.info("\n%s: %s", task.name, "; ".join(
            f"{key} {rewards['first'][key]:.3f} -> {rewards['last'][key]:.3f}" for key in REWARD_METRICS[:2] if key in rewards["first"]))
    log.info("run directory: %s", run_dir)
    return rewards.get("last", {}).get("rewards/margins")


def reward_trend(history: list[dict]) -> dict[str, dict[str, float]]:
    """The TRL reward metrics of the first and the last training log ({"first": {...}, "last": {...}, "steps"})."""
    logs = [entry for entry in history if "rewards/margins" in entry]
    if not logs:
        return {}
    pick = lambda entry: {k: float(entry[k]) for k in REWARD_METRICS if k in entry}  # noqa: E731
    return {"first": pick(logs[0]), "last": pick(logs[-1]),
            "steps": {"first": int(logs[0].get("step", 0) or 0), "last": int(logs[-1].get("step", 0) or 0)}}
