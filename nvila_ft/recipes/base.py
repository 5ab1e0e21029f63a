"""The steps every training recipe shares, in the spirit of torchtune's recipes: `setup` (check the config objects,
check the data, load and adapt the model, evaluate it), `train` (the recipe's trainer), `save` (the adapters,
evaluation again, metrics.json, the end). A recipe subclass says only what differs: its own checks, the data it
needs, the trainer it builds and the fields its summary adds. What only the main process of a launch does goes
through `self.rank_zero`."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvila_ft.adapters import AdapterPolicy, format_report, trainable_report
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.records import Record
from nvila_ft.data.validation import TaskDataCheck
from nvila_ft.domains.task import TaskData
from nvila_ft.model.source import ModelSource
from nvila_ft.recipes.loading import load_model
from nvila_ft.recipes.rank_zero import RankZero
from nvila_ft.recipes.runs import BASE_DIR, FINAL_DIR, checkpoint_to_resume, reset_accelerate, seed_everything
from nvila_ft.training.config import ConfigError, DataOptions, EvalOptions, Precision, TrainerConfig
from nvila_ft.training.cpu_threads import set_cpu_threads
from nvila_ft.training.deepspeed import (
    DeepSpeedConfig,
    end_distributed,
    ensure_single_process_env,
    gathered_parameters,
    join_deepspeed_comm,
    master_trainable_state,
)
from nvila_ft.training.evaluation import Evaluation, evaluate_records
from nvila_ft.training.fp8 import convert_llm_to_float8
from nvila_ft.training.planning import PlanOptions
from nvila_ft.training.run_checks import check_run, frozen_storage

log = logging.getLogger("nvila_ft")


@dataclass
class RunConfig:
    """A training run's directory, seed and CPU threads, its whole configuration as plain values (W&B records it),
    and the config objects built from it, one per section."""

    run_dir: Path
    seed: int
    cpu_threads: int | None
    values: dict[str, Any]
    policy: AdapterPolicy | None
    precision: Precision
    trainer: TrainerConfig
    deepspeed: DeepSpeedConfig
    logger: Any
    source: ModelSource
    task: Any
    data: DataOptions
    eval: EvalOptions


class Recipe(ABC):
    """setup -> train -> save. `name`: the command, in messages; `method`: what the adapters' metadata, the summary
    and the plot title record beside the task (None: plain fine-tuning)."""

    name: str
    method: str | None = None

    def __init__(self, config: RunConfig, plan: PlanOptions | None = None) -> None:
        """plan: the `plan:` section; given, the run logs its planned GPU memory once its data are checked."""
        self.config = config
        self.plan = plan
        self.policy = config.policy
        self.run_dir = config.run_dir
        self.rank_zero = RankZero(config.run_dir, config.logger)
        self.metrics: dict[str, dict[str, float]] = {}

    def run(self) -> float | None:
        """The whole run; returns the recipe's objective (what a sweep optimises)."""
        self.setup()
        result = self.train()
        return self.save(result)

    # ------------------------------------------------------------------ what a recipe says
    def check(self) -> None:
        """The recipe's own checks of the config objects, after those of every run (`check_run`)."""

    @abstractmethod
    def training_data(self, data: TaskData, processor: NVILAProcessor) -> tuple[list[Record], list[Record]]:
        """The training and validation records the recipe uses, checked (the data report is written here)."""

    def argument_overrides(self) -> dict[str, Any]:
        """Arguments of `TrainerConfig.training_arguments` of the recipe's own (its arguments class, ...)."""
        return {}

    def model_loaded(self) -> None:
        """After the model is loaded and the experiment logger started."""

    def selective_loss(self) -> bool:
        """Whether the model projects only the supervised positions through lm_head (trainer.selective_loss)."""
        return self.config.trainer.selective_loss

    @abstractmethod
    def build_trainer(self) -> Any:
        """The recipe's trainer of `self.model` (a transformers Trainer) on the training records."""

    def evaluated(self, stage: str, result: Evaluation) -> None:
        """After the evaluation at `stage` is recorded."""

    def described(self) -> dict[str, Any]:
        """Summary fields after task and policy (the recipe's settings)."""
        return {}

    def results(self) -> dict[str, Any]:
        """The summary's closing fields (the metrics and what the recipe measures besides)."""
        return {"metrics": self.metrics}

    def wandb_summary(self) -> dict[str, Any]:
        """What W&B's summary gets at the end."""
        return {}

    def conclude(self) -> float | None:
        """Log the run's outcome; returns its objective."""
        return None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        reset_accelerate()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._setup_checks()
        self._setup_data()
        self._setup_model()
        if self.config.eval.before_training and self.resume is None:
            self.evaluate("before_training")

    def _setup_checks(self) -> None:
        """Every config object is checked before anything heavy happens."""
        config = self.config
        if self.policy is None:
            raise ConfigError(f"{self.name} needs an adapter policy (adapters=<preset>); adapters=none trains nothing")
        check_run(self.policy, config.precision, config.trainer, config.deepspeed)
        self.check()
        config.source.check()
        self.resume = checkpoint_to_resume(self.run_dir) if config.trainer.resume else None
        set_cpu_threads(config.cpu_threads)
        seed_everything(config.seed)
        if config.deepspeed.enabled:
            ensure_single_process_env()

    def _setup_data(self) -> None:
        """The data, checked with the base checkpoint's processor before any weight loads."""
        config = self.config
        processor = NVILAProcessor.from_pretrained(config.source.checkpoint(self.run_dir / BASE_DIR),
                                                   **config.data.processor_options())
        self.train_records, self.validation_records = self.training_data(config.task.load(config.seed), processor)
        self.eval_records = config.eval.limit(self.validation_records)
        if self.plan is not None:
            self.rank_zero.log_estimate(self.policy, config.precision, config.trainer, config.deepspeed, config.data,
                                        self.train_records, processor, self.plan, config.seed)

    def require_validation(self, validation: list[Record], check: TaskDataCheck | None) -> None:
        """Without a usable validation record where the task wants one: stop (eval.on_empty=stop) or train without
        evaluation, saying why."""
        config = self.config
        if validation or not config.task.wants_validation:
            return
        why = check.validation.why_empty("validation") if check and check.validation.total else (
            "task.val_fraction held out no record" if config.task.validation is None else "the validation data is empty")
        if config.eval.on_empty == "stop":
            raise ConfigError(f"no usable validation record: {why}. Fix the validation data, or set eval.on_empty=train to train without evaluation")
        log.warning("no usable validation record (%s); training without evaluation (eval.on_empty=train)", why)

    def _setup_model(self) -> None:
        """Training arguments first (with ZeRO-3 they must exist before the model is loaded), then the model."""
        config = self.config
        self.args = config.trainer.training_arguments(
            self.run_dir, config.precision, config.seed, has_eval=bool(self.validation_records),
            report_to=config.logger.report_to, deepspeed=config.deepspeed.to_dict() if config.deepspeed.enabled else None,
            **self.argument_overrides(),
        )
        if config.deepspeed.enabled:
            join_deepspeed_comm()
        loaded = load_model(config.source, self.run_dir, config.precision, policy=self.policy,
                            processor_options=config.data.processor_options(),
                            storage=frozen_storage(config.precision, config.trainer))
        self.model, self.processor = loaded.model, loaded.processor
        if config.precision.fp8:
            conversion = convert_llm_to_float8(self.model, config.precision.fp8)
            log.info("%s; kept in %s: %s", conversion.summary(), config.precision.weights,
                     ", ".join(f"{name} ({why})" for name, why in conversion.kept.items()) or "none")
            self.rank_zero.write_float8_conversion(conversion)
        self.report = trainable_report(self.model, self.policy)
        log.info("adapter policy %s\n%s", self.policy.name or "", format_report(self.report))
        self.rank_zero.start_logger(config.values)
        self.model_loaded()

    def evaluate(self, stage: str) -> None:
        """Generation metrics of the evaluation records; every process takes part when ZeRO-3 shards the weights."""
        if not self.eval_records:
            return
        config = self.config
        with gathered_parameters(self.model):
            result = evaluate_records(self.model, self.processor, self.eval_records, config.task.metrics,
                                      config.eval.batch_size, config.task.max_new_tokens)
        self.metrics[stage] = result.scores
        self.rank_zero.evaluation(stage, result.scores, result.rows)
        self.evaluated(stage, result)

    # ------------------------------------------------------------------ train, save
    def train(self) -> Any:
        """The recipe's trainer, with the memory levers of trainer.* (none changes what is learned)."""
        self.model.selective_loss = self.selective_loss()
        components = self.config.trainer.checkpointed_components()
        if components:
            self.model.activation_checkpointing_enable(components=components)
        self.trainer = self.build_trainer()
        return self.trainer.train(resume_from_checkpoint=self.resume)

    def save(self, result: Any) -> float | None:
        """The trained adapters (`final/`) and the training curve, evaluation after training, metrics.json."""
        config, task, method = self.config, self.config.task, self.method_field()
        # under DeepSpeed the trained values are its float32 master copies, gathered by every process
        trained = master_trainable_state(self.model, keep=self.rank_zero.active) if config.deepspeed.enabled else None
        title = " / ".join([task.name, self.policy.name or "policy", *method.values()])
        self.rank_zero.save_final(self.model, self.policy, FINAL_DIR, {"task": task.name, **method}, trained,
                                  self.trainer.state.log_history, title)
        self.evaluate("after_training")
        self.rank_zero.write_metrics(self.summary(result))
        config.logger.log_summary(self.wandb_summary())
        config.logger.finish()
        objective = self.conclude()
        log.info("run directory: %s", self.run_dir)
        end_distributed()
        return objective

    def summary(self, result: Any) -> dict[str, Any]:
        """metrics.json."""
        return {
            "task": self.config.task.name,
            "policy": self.policy.name,
            **self.method_field(),
            **self.described(),
            "train_records": len(self.train_records),
            "validation_records": len(self.validation_records),
            "steps": self.trainer.state.global_step,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "train_loss": result.metrics.get("train_loss"),
            "trainable_parameters": {r.component: r.trainable for r in self.report},
            **self.results(),
        }

    def method_field(self) -> dict[str, str]:
        return {"method": self.method} if self.method else {}
