"""`rslora`: LoRA with rank-stabilised scaling (rsLoRA, Kalajdzievski 2023): the update is scaled by alpha / sqrt(r)
instead of alpha / r, so higher ranks keep learning instead of slowing down (PEFT's `use_rslora`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from nvila_ft.adapters.methods.lora import Lora


class RsLora(Lora):
    name = "rslora"
    options = {}  # the scaling is the method

    def unknown_option(self, where: str, key: str) -> str | None:
        if key == "rslora":
            return f"{where}.rslora: method rslora always scales by alpha / sqrt(r); leave rslora out"
        return None

    def peft_options(self, component: Any) -> dict[str, Any]:
        return {"use_rslora": True}

    def quantized_variant(self, component: Any) -> Any:
        return dataclasses.replace(component, method="qlora", options={"rslora": True})
