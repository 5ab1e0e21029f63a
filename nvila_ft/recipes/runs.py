"""A run directory's pieces (its base checkpoint, its trained adapters, the checkpoint to resume from) and the
process state a run starts from (seeds, accelerate's state)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from nvila_ft.adapters.artifacts import POLICY_FILE
from nvila_ft.recipes.rank_zero import RankZero
from nvila_ft.training.config import ConfigError
from nvila_ft.training.trainer import ADAPTERS_DIR, complete_checkpoints

FINAL_DIR = "final"
BASE_DIR = "base"


def checkpoint_to_resume(run_dir: Path) -> str:
    """The newest complete checkpoint of a run (trainer.resume=true). The main process first removes the folders a
    stop left half-written; the choice does not depend on it."""
    RankZero(run_dir).remove_incomplete_checkpoints()
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        raise ConfigError(f"trainer.resume=true but {run_dir} has no complete checkpoint to resume from")
    return str(checkpoints[-1])


def trained_adapters(run: Path) -> Path:
    """The adapters a run produced: `final/`, else those of its last complete checkpoint."""
    if (run / FINAL_DIR / POLICY_FILE).is_file():
        return run / FINAL_DIR
    checkpoints = complete_checkpoints(run)
    if checkpoints:
        return checkpoints[-1] / ADAPTERS_DIR
    raise ConfigError(f"{run}: no trained adapters (no {FINAL_DIR}/ and no complete checkpoint-*/)")


def seed_everything(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed = {seed!r}: expected an integer")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state between jobs of a sweep run in one process."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # noqa: BLE001 - nothing to reset
        pass
