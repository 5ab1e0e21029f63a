"""The adapter methods, one module each, registered here one line a method.

Adding a method: a module with a `Method` subclass (usually of `Lora`), a line below, a preset in `adapters/`.
"""

from __future__ import annotations

from typing import Any

from nvila_ft.adapters.methods.base import Method, Option, PolicyError
from nvila_ft.adapters.methods.dora import Dora
from nvila_ft.adapters.methods.fp8_lora import Fp8Lora
from nvila_ft.adapters.methods.frozen import Frozen
from nvila_ft.adapters.methods.full import Full
from nvila_ft.adapters.methods.layernorm import LayerNorm
from nvila_ft.adapters.methods.lora import Lora
from nvila_ft.adapters.methods.loraplus import LoraPlus
from nvila_ft.adapters.methods.pissa import Pissa
from nvila_ft.adapters.methods.qlora import QLora
from nvila_ft.adapters.methods.rslora import RsLora

REGISTRY: dict[str, Method] = {
    "frozen": Frozen(),
    "layernorm": LayerNorm(),
    "lora": Lora(),
    "dora": Dora(),
    "qlora": QLora(),
    "fp8_lora": Fp8Lora(),
    "full": Full(),
    "rslora": RsLora(),
    "loraplus": LoraPlus(),
    "pissa": Pissa(),
}


def method_of(component: Any) -> Method:
    """The method object of a ComponentPolicy (PolicyError naming the choices for an unknown method)."""
    method = REGISTRY.get(component.method)
    if method is None:
        raise PolicyError(f"unknown adapter method {component.method!r}; choose one of {', '.join(REGISTRY)}")
    return method


__all__ = ["REGISTRY", "Method", "Option", "PolicyError", "method_of"]
