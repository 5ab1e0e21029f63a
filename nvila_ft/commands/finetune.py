"""`nvila-ft finetune`: check everything, check the data, load, evaluate, train, evaluate again
(`nvila_ft.recipes.finetune.Finetune`)."""

from __future__ import annotations

from omegaconf import DictConfig

from nvila_ft.commands.common import run_recipe
from nvila_ft.recipes.finetune import Finetune


def finetune(cfg: DictConfig) -> float | None:
    """Returns the task's objective metric after training (what a sweep optimises)."""
    return run_recipe(cfg, Finetune, "plan")
