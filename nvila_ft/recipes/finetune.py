"""Supervised fine-tuning: the next-token loss on the task's replies, with DeepSpeed, FP8 and the memory levers as
configured; evaluated before and after training beside image-blind baselines."""

from __future__ import annotations

import logging

from nvila_ft.data.dataset import Collator, ConversationDataset
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.records import Record
from nvila_ft.data.validation import check_task_data
from nvila_ft.domains.baselines import baseline_scores, describe_baselines, describe_by_question_type, scores_by_question_type
from nvila_ft.domains.task import TaskData
from nvila_ft.recipes.base import Recipe
from nvila_ft.training.config import ConfigError
from nvila_ft.training.evaluation import Evaluation
from nvila_ft.training.trainer import NVILATrainer, build_trainer, train_sampler

log = logging.getLogger("nvila_ft")


class Finetune(Recipe):
    """Returns the task's objective metric after training."""

    name = "finetune"

    def check(self) -> None:
        self.config.precision.check_device()

    def training_data(self, data: TaskData, processor: NVILAProcessor) -> tuple[list[Record], list[Record]]:
        """Every record goes through the processor (media, answer, length); bad ones are skipped or refuse the run,
        never silently, and evaluation is decided from what is left."""
        config, check = self.config, None
        train, validation = data.train, data.validation
        if config.data.validate:
            check = check_task_data(data, processor, progress=True)
            self.rank_zero.data_check(check, config.data.on_bad_record)
            train, validation = check.train.good, check.validation.good
        if not train:
            raise ConfigError("no usable training record: " + (check.train.why_empty("training") if check else "the training data is empty"))
        self.require_validation(validation, check)
        self.lengths = check.train.lengths if check else []
        return train, validation

    def model_loaded(self) -> None:
        trainable = {f"trainable/{r.component}": r.trainable for r in self.report}
        self.config.logger.log_summary(trainable | {"trainable/total": sum(r.trainable for r in self.report)})
        self.baselines = baseline_scores(self.train_records, self.eval_records, self.config.task.metrics)
        self.by_type: dict[str, dict[str, dict[str, float]]] = {}

    def evaluated(self, stage: str, result: Evaluation) -> None:
        objective = self.config.task.objective_metric
        self.by_type[stage] = scores_by_question_type(result.rows, objective)
        self.rank_zero.prediction_table(stage, result.rows)
        if self.by_type[stage]:
            self.rank_zero.info("  by question type: %s", describe_by_question_type(self.by_type[stage], objective))

    def build_trainer(self) -> NVILATrainer:
        config, processor, validation = self.config, self.processor, self.validation_records
        sampler = train_sampler(config.data, self.train_records, self.lengths, config.trainer.per_device_train_batch_size, config.seed)
        collator = Collator(processor, max_tokens=config.data.max_tokens if config.data.packing else None)
        return build_trainer(self.model, self.policy, self.args, ConversationDataset(self.train_records, processor),
                             ConversationDataset(validation, processor) if validation else None, collator, train_sampler=sampler,
                             offload_activations=config.trainer.offload_activations, eval_collator=Collator(processor))

    def results(self) -> dict:
        return {"metrics": self.metrics, "metrics_by_question_type": self.by_type, "image_blind_baselines": self.baselines}

    def wandb_summary(self) -> dict:
        return {f"baseline/{name}/{k}": v for name, scores in self.baselines.items() for k, v in scores.items()}

    def conclude(self) -> float | None:
        objective, metrics = self.config.task.objective_metric, self.metrics
        if "after_training" in metrics:
            before = f"{metrics['before_training'][objective]:.3f} before -> " if "before_training" in metrics else ""
            log.info("\n%s: %s %s%.3f after training%s", self.config.task.name, objective, before,
                     metrics["after_training"][objective], describe_baselines(self.baselines, objective))
        return metrics.get("after_training", {}).get(objective)
