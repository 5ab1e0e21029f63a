"""`fp8_lora`: LoRA on a base whose targeted linears are stored in float8 (torchao, e4m3, one scale per row);
the arithmetic stays 16-bit and no dequantized copy of a weight is kept for backward (`float8_weights`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from nvila_ft.adapters.components import get_component, is_quantized
from nvila_ft.adapters.float8_weights import keep_float8_for_backward
from nvila_ft.adapters.methods.base import PolicyError
from nvila_ft.adapters.methods.lora import lora_targets
from nvila_ft.adapters.methods.quantized import QuantizedLora


def float8_on_load(component: Any, skip: Sequence[str] = ("lm_head",)) -> Any:
    """transformers' torchao quantization for an fp8_lora component whose LoRA targets are the default ones (every
    linear of the component but those in `skip`: the LLM's lm_head, the vision tower's unused head): each weight is stored in float8 as it loads, so the whole 16-bit base is
    never in memory at once. None for other targets (then `quantize_float8` converts them after loading)."""
    if component.target_modules is not None or component.exclude_modules:
        return None
    from torchao.quantization import Float8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Float8WeightOnlyConfig(), modules_to_not_convert=list(skip))


def quantize_float8(module: nn.Module, targets: dict[str, Any]) -> None:
    """Store the targeted linears' weights in float8 (e4m3, per-row scales) with torchao; compute stays 16-bit."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    config = LoraConfig(**targets)
    chosen = lambda m, fqn: isinstance(m, nn.Linear) and bool(check_target_module_exists(config, fqn))  # noqa: E731
    if not is_quantized(module):  # (a base quantized as it loaded, `float8_on_load`, is already)
        quantize_(module, Float8WeightOnlyConfig(), filter_fn=chosen)
    for name, linear in module.named_modules():
        if isinstance(linear, nn.Linear) and hasattr(linear.weight, "dequantize") and chosen(linear, name):
            keep_float8_for_backward(linear)  # no 16-bit copy of each weight held until backward


class Fp8Lora(QuantizedLora):
    name = "fp8_lora"

    def check(self, name: str, component: Any, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        super().check(name, component, model_config, precision, deepspeed)
        if importlib.util.find_spec("torchao") is None:
            raise PolicyError(f"adapters.{name}.method = fp8_lora stores weights in float8 with torchao: pip install torchao")
        if deepspeed is not None and deepspeed.stage == 3:
            raise PolicyError(f"adapters.{name}: fp8_lora float8 weight tensors cannot be sharded by ZeRO-3; use deepspeed=zero2")

    def load_kwargs(self, component: Any, skip: list[str], device_map: Any) -> dict[str, Any]:
        config = float8_on_load(component, skip)  # (fp8_lora is refused under ZeRO-3)
        return {} if config is None else {"quantization_config": config, "device_map": device_map}

    def prepare_base(self, model: Any, name: str, component: Any) -> None:
        quantize_float8(get_component(model, name), lora_targets(model, name, component))

    def prepare_load(self, module: nn.Module, name: str, path: Path) -> None:
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(str(path / name))
        quantize_float8(module, {"target_modules": config.target_modules})

    # ------------------------------------------------------------------ planner
    def stored_linears(self, module: nn.Module, name: str) -> list[nn.Linear]:
        # the LoRA targets: every linear that carries an adapter
        return [m.base_layer for m in module.modules() if isinstance(getattr(m, "base_layer", None), nn.Linear)]

    def storage_word(self, component: Any) -> str:
        return "in float8"
