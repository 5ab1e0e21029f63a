"""`qlora`: LoRA on a base that bitsandbytes quantizes to 4 or 8 bits as it loads (`quantization` settings)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvila_ft.adapters.components import get_component, is_quantized
from nvila_ft.adapters.methods.base import PolicyError
from nvila_ft.adapters.methods.quantized import QuantizedLora


class QLora(QuantizedLora):
    name = "qlora"

    def check(self, name: str, component: Any, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        super().check(name, component, model_config, precision, deepspeed)
        component.quantization.check(f"adapters.{name}")
        if deepspeed is not None and deepspeed.stage == 3:
            weights = getattr(precision, "weights", "float32")
            storage = component.quantization.storage_dtype
            if component.quantization.bits != 4 or storage != weights:
                raise PolicyError(
                    f"ZeRO-3 shards a 4-bit base only when the quantized weights are stored in the model dtype: set "
                    f"adapters.{name}.quantization.storage_dtype={weights} (now {storage}, "
                    f"{component.quantization.bits}-bit), or use deepspeed=zero2"
                )

    def load_kwargs(self, component: Any, skip: list[str], device_map: Any) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        q = component.quantization
        config = BitsAndBytesConfig(
            load_in_4bit=q.bits == 4,
            load_in_8bit=q.bits == 8,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, q.storage_dtype),
            llm_int8_skip_modules=skip,
        )
        return {"quantization_config": config} | ({"device_map": device_map} if device_map is not None else {})

    def apply(self, model: Any, name: str, component: Any) -> None:
        if not is_quantized(get_component(model, name)):
            raise PolicyError(
                f"adapters.{name}.method = qlora, but the {name} was loaded in 16 bits; load the model with "
                "nvila_ft.adapters.load_for_policy (or a quantization_config) so the base is quantized on load"
            )
        super().apply(model, name, component)

    def prepare_load(self, module: nn.Module, name: str, path: Path) -> None:
        if not is_quantized(module):
            raise PolicyError(f"{path}: {name} was trained with a quantized base; load the base with load_for_policy")

    # ------------------------------------------------------------------ planner
    def stored_linears(self, module: nn.Module, name: str) -> list[nn.Linear]:
        skip = {"llm": "lm_head", "vision_tower": "head"}.get(name, "")
        linears = {id(m): m for n, m in module.named_modules()
                   if isinstance(m, nn.Linear) and skip not in n.split(".") and "lora_" not in n}
        return list(linears.values())

    def stored_bytes(self, linear: nn.Linear, component: Any) -> int:
        if component.quantization.bits == 8:
            return super().stored_bytes(linear, component)  # int8 codes, one float32 absmax per row
        # 4-bit: two codes a byte, one absmax per block of 64 and the 16-value float32 code book; double quantization
        # stores the absmax in 8 bits with a float32 absmax per 256 of them, a 256-value code book and an offset
        numel = linear.weight.numel()
        blocks = math.ceil(numel / 64)
        if component.quantization.double_quant:
            return math.ceil(numel / 2) + 4 * 16 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
        return math.ceil(numel / 2) + 4 * 16 + 4 * blocks

    def storage_word(self, component: Any) -> str:
        q = component.quantization
        return f"in {q.bits}-bit" + (" (double-quantized constants)" if q.double_quant and q.bits == 4 else "")
