"""`dora`: DoRA (weight-decomposed LoRA) on a 16-bit base: PEFT's `use_dora`, a trainable magnitude per output row."""

from __future__ import annotations

import dataclasses
from typing import Any

from nvila_ft.adapters.methods.lora import Lora


class Dora(Lora):
    name = "dora"

    def peft_options(self, component: Any) -> dict[str, Any]:
        return {**super().peft_options(component), "use_dora": True}

    def quantized_variant(self, component: Any) -> Any:
        return dataclasses.replace(component, method="qlora", options={**component.options, "dora": True})
