"""The three components of an NVILA model as the adapter code sees them, and facts about their weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def get_component(model: Any, name: str) -> nn.Module:
    """The module a policy component acts on: `llm`, the SigLIP model, or the projector."""
    if name == "vision_tower":
        return model.vision_tower.model
    return getattr(model, name)


def set_component(model: Any, name: str, module: nn.Module) -> None:
    if name == "vision_tower":
        model.vision_tower.model = module
    else:
        setattr(model, name, module)


def base_module(module: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (the module itself when not wrapped)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def is_quantized(module: nn.Module) -> bool:
    """Whether any weight of the module is stored quantized (bitsandbytes 4/8-bit or a torchao tensor)."""
    return any(
        getattr(p, "quant_state", None) is not None
        or getattr(p, "SCB", None) is not None
        or type(p) not in (torch.Tensor, nn.Parameter)
        for p in module.parameters()
    )


def parameter_count(parameter: torch.Tensor) -> int:
    """Real parameter count, also for 4-bit bitsandbytes weights stored packed and for DeepSpeed ZeRO-3 shards."""
    state = getattr(parameter, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return int(getattr(parameter, "ds_numel", 0)) or parameter.numel()


def linear_names(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
