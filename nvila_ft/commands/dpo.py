"""`nvila-ft dpo`: preference tuning (DPO, IPO, ... from TRL) of a model with an adapter policy, on a preference
task (`nvila_ft.recipes.dpo.DPO`); the run directory has finetune's layout, so `evaluate run=` and `export run=`
work on it. `DPOOptions` is its `dpo:` section."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from omegaconf import DictConfig

from nvila_ft.commands.common import run_recipe
from nvila_ft.recipes.dpo import DPO
from nvila_ft.training.config import ConfigError

# TRL 1.16's DPOTrainer losses (`DPOConfig.loss_type`)
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# the loss types whose TRL 1.16 formula uses DPOConfig.label_smoothing
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")


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
    return run_recipe(cfg, DPO, "dpo")
