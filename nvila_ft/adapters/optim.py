"""Optimizer parameter groups: one per (component, decay / no-decay), each with its own LR and weight decay.

Nothing overrides anything else (the official trainer silently drops the vision LR when a projector LR is
set). Biases, normalisation weights and DoRA magnitudes are not decayed. A method may give some of its parameters
a multiple of the component's learning rate (LoRA+: its B matrices), in groups of their own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nvila_ft.adapters.apply import get_component
from nvila_ft.adapters.methods import method_of
from nvila_ft.adapters.policy import AdapterPolicy, PolicyError


def no_decay_parameter_ids(module: nn.Module) -> set[int]:
    ids = set()
    for sub_name, sub in module.named_modules():
        is_norm = "norm" in type(sub).__name__.lower()
        for name, param in sub.named_parameters(recurse=False):
            if is_norm or name == "bias" or "lora_magnitude_vector" in sub_name:
                ids.add(id(param))
    return ids


def by_lr_multiplier(component: Any, named: list[tuple[str, nn.Parameter]]) -> dict[float, list[nn.Parameter]]:
    """The parameters by the multiple of the component's learning rate their method gives them (1 but for LoRA+)."""
    method = method_of(component)
    out: dict[float, list[nn.Parameter]] = {}
    for name, param in named:
        out.setdefault(float(method.lr_multiplier(component, name, param)), []).append(param)
    return out


def parameter_groups(model: Any, policy: AdapterPolicy, learning_rate: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Groups for torch optimizers; each carries `name`, `lr`, `weight_decay` and `params` (trainable only)."""
    groups, seen = [], set()
    for name, component in policy.items():
        module = get_component(model, name)
        no_decay = no_decay_parameter_ids(module)
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        seen |= {id(p) for _, p in params}
        lr = component.learning_rate(learning_rate)
        decay = component.weight_decay if component.weight_decay is not None else weight_decay
        for suffix, members, wd in (
            ("decay", [(n, p) for n, p in params if id(p) not in no_decay], decay),
            ("no_decay", [(n, p) for n, p in params if id(p) in no_decay], 0.0),
        ):
            for multiplier, chosen in by_lr_multiplier(component, members).items():
                label = f"{name}/{suffix}" if multiplier == 1.0 else f"{name}/{suffix}@lr_x{multiplier:g}"
                groups.append({"name": label, "params": chosen, "lr": lr * multiplier, "weight_decay": wd})
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if stray:
        raise PolicyError(f"trainable parameters outside the three components: {stray[:5]}")
    if not groups:
        raise PolicyError("no trainable parameters to optimise")
    return groups


def build_optimizer(
    model: Any,
    policy: AdapterPolicy,
    learning_rate: float,
    weight_decay: float = 0.0,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    return optimizer_cls(parameter_groups(model, policy, learning_rate, weight_decay), lr=learning_rate, **optimizer_kwargs)
