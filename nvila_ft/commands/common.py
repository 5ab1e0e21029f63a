"""What every command needs: building config objects, finding a run's pieces, loading model + processor."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy
from nvila_ft.adapters.artifacts import POLICY_FILE, load_adapters
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.source import ModelSource
from nvila_ft.training.config import ConfigError, Precision

log = logging.getLogger("nvila_ft")
FINAL_DIR = "final"
BASE_DIR = "base"


def build(node: Any) -> Any:
    """Instantiate a config node (`_target_` + arguments); None or an empty node (`adapters=none`) is None."""
    if node is None or len(node) == 0:
        return None
    from hydra.utils import instantiate

    return instantiate(node, _convert_="all")


def plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state between jobs of a sweep run in one process."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # noqa: BLE001 - nothing to reset
        pass


@dataclass
class Loaded:
    model: NVILAForConditionalGeneration
    processor: NVILAProcessor
    checkpoint: Path


def load_model(
    source: ModelSource,
    run_dir: Path,
    precision: Precision,
    policy: AdapterPolicy | None = None,
    adapters: Path | None = None,
    trainable: bool = False,
) -> Loaded:
    """Base checkpoint (presets are built into `<run_dir>/base` once), quantized as the policy needs, then either
    fresh adapters (`policy`) or saved ones (`adapters`)."""
    checkpoint = source.checkpoint(run_dir / BASE_DIR)
    if adapters is not None:
        policy = AdapterPolicy.from_dict(json.loads((adapters / POLICY_FILE).read_text())["policy"])
    if policy is not None:
        model = load_for_policy(checkpoint, policy, precision.dtype, device(), source.attn_implementation)
    else:
        model = NVILAForConditionalGeneration.from_pretrained(
            checkpoint, dtype=precision.dtype, attn_implementation=source.attn_implementation, device=device()
        )
    if adapters is not None:
        load_adapters(model, adapters, is_trainable=trainable)
    elif policy is not None:
        apply_policy(model, policy)
    if policy is not None and precision.trainable_float32 and precision.dtype != torch.float32:
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point():
                param.data = param.data.float()
    return Loaded(model, NVILAProcessor.from_pretrained(checkpoint), checkpoint)


def trained_adapters(run: Path) -> Path:
    """The adapters a run produced: `final/`, else those of its last complete checkpoint."""
    from nvila_ft.training.trainer import ADAPTERS_DIR, complete_checkpoints

    if (run / FINAL_DIR / POLICY_FILE).is_file():
        return run / FINAL_DIR
    checkpoints = complete_checkpoints(run)
    if checkpoints:
        return checkpoints[-1] / ADAPTERS_DIR
    raise ConfigError(f"{run}: no trained adapters (no {FINAL_DIR}/ and no complete checkpoint-*/)")


def run_config(run: str | Path, cli_overrides: list[str]) -> DictConfig:
    """A run's configuration as composed when it ran, with this command's overrides applied on top."""
    from hydra import compose

    run = Path(run)
    saved = run / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run}: not an nvila-ft run directory (no .hydra/overrides.yaml)")
    overrides = [str(o) for o in OmegaConf.load(saved)] + cli_overrides  # later ones win
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("run", "run_dir")]
    return compose(config_name="config", overrides=kept + [f"run_dir={run}", f"run={run}"])


def cli_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task]
