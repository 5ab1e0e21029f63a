"""What the LoRA methods on a quantized base (qlora, fp8_lora) share: DoRA as an option, no FP8 compute of the LLM,
never the projector, and the planner counts them as their 16-bit LoRA with the base linears stored in fewer bits."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from nvila_ft.adapters.methods.base import Option, PolicyError
from nvila_ft.adapters.methods.lora import Lora


class QuantizedLora(Lora):
    quantized_base = True
    options = {**Lora.options, "dora": Option(False, bool, "DoRA (a trainable magnitude per output row) on the quantized base")}

    def check(self, name: str, component: Any, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        super().check(name, component, model_config, precision, deepspeed)
        if name == "mm_projector":
            raise PolicyError(
                f"adapters.mm_projector.method = {component.method}: the projector is small and trained in full in every "
                "official recipe; quantizing it saves nothing. Use method: full (or lora)"
            )
        if name == "llm" and precision is not None and precision.fp8 is not None:
            raise PolicyError(
                f"precision.fp8 computes from the LLM's 16-bit weights, but adapters.llm.method = {component.method} stores "
                "them quantized; use adapters.llm.method=lora (float8 compute of the frozen 16-bit base) or precision=bf16"
            )

    def peft_options(self, component: Any) -> dict[str, Any]:
        return {**super().peft_options(component), "use_dora": self.option(component, "dora")}

    def counted_as(self, component: Any) -> Any:
        options = {k: v for k, v in component.options.items() if k != "dora"}
        return dataclasses.replace(component, method="dora" if self.option(component, "dora") else "lora", options=options)

    def stored_bytes(self, linear: nn.Linear, component: Any) -> int:
        return linear.weight.numel() + 4 * linear.weight.shape[0]  # 8-bit codes, one float32 scale per row

    def quantized_variant(self, component: Any) -> Any:
        return None
