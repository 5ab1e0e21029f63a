"""`layernorm`: only the normalisation layers' weights train (LayerNorm / RMSNorm), as in NVILA's LN tuning."""

from __future__ import annotations

from typing import Any

from torch import nn

from nvila_ft.adapters.components import get_component
from nvila_ft.adapters.methods.base import Method, PolicyError


def norm_parameters(module: nn.Module, within: list[nn.Module] | None = None) -> list[nn.Parameter]:
    """Parameters of normalisation layers (LayerNorm / RMSNorm); with `within`, only those inside those modules."""
    allowed = None if within is None else {id(p) for m in within for p in m.parameters()}
    found = []
    for sub in module.modules():
        if "norm" in type(sub).__name__.lower():
            found += [p for p in sub.parameters(recurse=False) if allowed is None or id(p) in allowed]
    return found


class LayerNorm(Method):
    name = "layernorm"

    def check(self, name: str, component: Any, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        if name == "mm_projector" and model_config is not None and model_config.stc_factor == 1:
            raise PolicyError(
                f"adapters.mm_projector.method = layernorm, but the {model_config.projector_type!r} projector has no "
                "LayerNorm; use full or frozen"
            )

    def adapt(self, model: Any, name: str, component: Any) -> None:
        used = model.vision_tower.used_layers() if name == "vision_tower" else None
        params = norm_parameters(get_component(model, name), used)
        if not params:
            raise PolicyError(f"adapters.{name}.method = layernorm, but the {name} has no normalisation layer")
        for param in params:
            param.requires_grad_(True)
