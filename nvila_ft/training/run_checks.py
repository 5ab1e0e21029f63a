"""The checks a training run passes before anything loads (finetune, dpo; plan, for its run and its suggestions)."""

from __future__ import annotations

from typing import Any

from nvila_ft.adapters.frozen_storage import FrozenStorage
from nvila_ft.adapters.policy import AdapterPolicy
from nvila_ft.training.config import ConfigError, Precision


def check_run(policy: AdapterPolicy, precision: Precision, trainer: Any, deepspeed: Any) -> None:
    """The settings of a run, each alone and together; the first problem is a ConfigError (or a PolicyError)."""
    precision.check()
    trainer.check()
    deepspeed.check(precision)
    policy.check(precision=precision, deepspeed=deepspeed)
    storage = frozen_storage(precision, trainer)
    problems = storage.problems(policy)
    if problems:
        raise ConfigError(problems[0])
    if storage.any and deepspeed.enabled:
        raise ConfigError("trainer.offload_embeddings and precision.lm_head_bits / vision_tower_bits are levers of runs "
                          "without DeepSpeed (it casts every floating tensor of the model to its dtype, and ZeRO-3 shards "
                          "frozen weights itself); set them back to false / 16, or use deepspeed=none")
    if deepspeed.offload_optimizer and trainer.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ConfigError(f"trainer.optim = {trainer.optim}: ZeRO-Offload steps DeepSpeed's CPU Adam; use adamw_torch, "
                          "or a deepspeed option without offload")


def frozen_storage(precision: Precision, trainer: Any) -> FrozenStorage:
    """Where a run keeps its frozen weights (trainer.offload_embeddings, precision.lm_head_bits / vision_tower_bits)."""
    return FrozenStorage(trainer.offload_embeddings, precision.lm_head_bits, precision.vision_tower_bits)
