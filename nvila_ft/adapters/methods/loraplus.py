"""`loraplus`: LoRA+ (Hayou et al. 2024): the B matrices learn `loraplus_lr_ratio` times faster than the A matrices
(16 in the paper and in PEFT's `create_loraplus_optimizer`).

PEFT's helper builds a whole optimizer with one learning rate for the model; nvila-ft's optimizer groups are per
component (each its own learning rate and weight decay, `nvila_ft.adapters.optim`), so PEFT's grouping rule is
applied inside this component's groups instead: a tensor named `lora_B` or with one dimension (a bias) gets the
component's learning rate times the ratio, the others the component's rate. (PEFT's fixed 1e-6 rate for LoRA on
embedding layers is a rate for the whole model; here they keep the component's.)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nvila_ft.adapters.methods.base import Option, PolicyError
from nvila_ft.adapters.methods.lora import Lora


class LoraPlus(Lora):
    name = "loraplus"
    options = {**Lora.options, "loraplus_lr_ratio": Option(16.0, float, "learning rate of the B matrices / that of the A matrices")}

    def check(self, name: str, component: Any, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        super().check(name, component, model_config, precision, deepspeed)
        ratio = self.option(component, "loraplus_lr_ratio")
        if ratio <= 0:
            raise PolicyError(f"adapters.{name}.loraplus_lr_ratio = {ratio}: must be > 0 (LoRA+ uses 16; 1 is plain LoRA)")

    def lr_multiplier(self, component: Any, parameter_name: str, parameter: nn.Parameter) -> float:
        if "lora_B" in parameter_name or parameter.ndim == 1:
            return float(self.option(component, "loraplus_lr_ratio"))
        return 1.0

    def quantized_variant(self, component: Any) -> Any:
        return None
