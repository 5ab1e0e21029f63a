"""Preference tuning (DPO, IPO, ... from TRL) on chosen / rejected replies, in one process; the run directory has
finetune's layout, so `evaluate run=` and `export run=` work on it."""

from __future__ import annotations

import logging
from typing import Any

from trl import DPOConfig

from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.records import Record
from nvila_ft.data.validation import check_task_data
from nvila_ft.domains.task import TaskData
from nvila_ft.recipes.base import Recipe, RunConfig
from nvila_ft.training import preference
from nvila_ft.training.config import ConfigError

log = logging.getLogger("nvila_ft")


class DPO(Recipe):
    """Returns the last logged rewards/margins (what a sweep would maximise). options: the `dpo:` section (TRL's
    DPOConfig settings: `config_arguments()`, `loss_type`, `beta`)."""

    name = method = "dpo"

    def __init__(self, config: RunConfig, options: Any) -> None:
        super().__init__(config)
        self.options = options

    def check(self) -> None:
        preference.check_preference_run(self.policy, self.config.precision, self.config.deepspeed, self.config.data)

    def training_data(self, data: TaskData, processor: NVILAProcessor) -> tuple[list[Record], list[Record]]:
        """Preference records only; both conversations of each pair checked before any weight loads."""
        preference.require_pairs(data.train + data.validation)
        train, validation = data.train, data.validation
        if self.config.data.validate:
            check = check_task_data(data, processor, progress=True)
            train, validation = preference.check_rejected_replies(check, processor)
            self.rank_zero.data_check(check, self.config.data.on_bad_record)
        if not train:
            raise ConfigError("no usable preference record for training; see data_report.txt in the run directory")
        return train, validation

    def argument_overrides(self) -> dict[str, Any]:
        return {"arguments_class": DPOConfig, **self.options.config_arguments()}

    def selective_loss(self) -> bool:
        return False  # TRL projects the reply positions through lm_head itself

    def build_trainer(self) -> preference.NVILADPOTrainer:
        """TRL's loss against the reference: this model with its adapters disabled."""
        return preference.build_dpo_trainer(self.model, self.policy, self.args, self.train_records, self.validation_records,
                                            self.processor, offload_activations=self.config.trainer.offload_activations)

    def train(self) -> Any:
        result = super().train()
        self.rewards = preference.reward_trend(self.trainer.state.log_history)
        return result

    def described(self) -> dict:
        return {"loss_type": self.options.loss_type, "beta": self.options.beta}

    def results(self) -> dict:
        return {"rewards": self.rewards, "metrics": self.metrics}

    def wandb_summary(self) -> dict:
        return {f"rewards/{stage}/{k}": v for stage, values in self.rewards.items() for k, v in values.items()}

    def conclude(self) -> float | None:
        if self.rewards:
            first, last = self.rewards["first"], self.rewards["last"]
            log.info("\n%s: %s", self.config.task.name, "; ".join(
                f"{key} {first[key]:.3f} -> {last[key]:.3f}" for key in preference.REWARD_METRICS[:2] if key in first))
        return self.rewards.get("last", {}).get("rewards/margins")
