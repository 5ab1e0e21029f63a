"""`full`: every weight of the component trains (the vision tower's unused last layers excepted)."""

from __future__ import annotations

from typing import Any

from nvila_ft.adapters.components import get_component
from nvila_ft.adapters.methods.base import Method


# Components whose full training would make the DPO reference keep a copy of the whole component (a fully trained
# projector is small: the reference keeps a copy of its values).
LARGE_COMPONENTS = ("vision_tower", "llm")


class Full(Method):
    name = "full"
    trains_base_weights = True

    def reference_problem(self, name: str) -> str | None:
        if name not in LARGE_COMPONENTS:
            return None
        return (f"dpo: adapters.{name}.method = full would keep a second copy of the {name} as the reference model; "
                f"use lora, dora, qlora or layernorm for the {name} (e.g. adapters=ln_vit_lora_llm or lora_vit_lora_llm)")

    def adapt(self, model: Any, name: str, component: Any) -> None:
        get_component(model, name).requires_grad_(True)
        if name == "vision_tower":
            unused = set(model.vision_tower.unused_parameter_names())
            for param_name, param in model.vision_tower.named_parameters():
                if param_name in unused:
                    param.requires_grad_(False)
