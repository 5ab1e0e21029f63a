"""Turning an AdapterPolicy into PEFT / bitsandbytes / torchao calls on an NVILA model.

Each component gets its own PEFT adapter (own method, rank and targets), so the LLM adapter is a standard
PEFT adapter of a plain `Qwen2ForCausalLM` and the vision adapter one of a plain `SiglipVisionModel`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from nvila_ft.adapters.components import base_module, get_component, is_quantized, parameter_count, set_component
from nvila_ft.adapters.methods import method_of
from nvila_ft.adapters.policy import AdapterPolicy, PolicyError

__all__ = ["apply_policy", "base_module", "format_report", "get_component", "is_quantized", "load_for_policy",
           "parameter_count", "set_component", "trainable_report"]


# ------------------------------------------------------------------ loading with quantized bases
def load_for_policy(
    path: str | os.PathLike,
    policy: AdapterPolicy,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
) -> Any:
    """Load a checkpoint with the components that a policy trains on a quantized base quantized as it loads
    (bitsandbytes for qlora, torchao float8 for fp8_lora with its default targets), one tensor at a time."""
    from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration

    from transformers.integrations import is_deepspeed_zero3_enabled

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    placement = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    device_map = None if is_deepspeed_zero3_enabled() else placement  # ZeRO-3 places (and shards) the weights itself
    kwargs = {name: method_of(getattr(policy, name)).load_kwargs(getattr(policy, name), skip, device_map)
              for name, skip in (("llm", ["lm_head"]), ("vision_tower", ["head"]))}
    model = NVILAForConditionalGeneration.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        device=device,
        llm_kwargs=kwargs["llm"],
        vision_kwargs=kwargs["vision_tower"],
    )
    # bitsandbytes repacks a 4-bit layer for its CPU inference kernel the first time it runs in eval mode (absmax
    # rounded to bf16), after which training through it fails; nvila-ft evaluates and trains the same weights
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


# ------------------------------------------------------------------ application
def apply_policy(model: Any, policy: AdapterPolicy) -> Any:
    """Freeze everything, then make each component trainable as its policy says. Returns the model."""
    policy.check(model.config)
    model.requires_grad_(False)
    for name, component in policy.items():
        method_of(component).apply(model, name, component)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise PolicyError("the adapter policy left no trainable parameter")
    return model


# ------------------------------------------------------------------ report
@dataclass(frozen=True)
class ComponentReport:
    component: str
    method: str
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def trainable_report(model: Any, policy: AdapterPolicy | None = None) -> list[ComponentReport]:
    """Trainable and total parameters per component (4-bit weights counted unpacked); each component's method is
    the policy's (`-` without one)."""
    rows = []
    for name in ("vision_tower", "mm_projector", "llm"):
        params = list(get_component(model, name).parameters())
        method = getattr(policy, name).method if policy is not None else "-"
        rows.append(
            ComponentReport(
                name,
                method,
                sum(parameter_count(p) for p in params if p.requires_grad),
                sum(parameter_count(p) for p in params),
            )
        )
    return rows


def format_report(rows: list[ComponentReport]) -> str:
    total_trainable, total = sum(r.trainable for r in rows), sum(r.total for r in rows)
    lines = [f"{'component':<14}{'method':<11}{'trainable':>15}{'total':>17}{'share':>9}"]
    for r in rows:
        lines.append(f"{r.component:<14}{r.method:<11}{r.trainable:>15,}{r.total:>17,}{100 * r.share:>8.3f}%")
    lines.append(f"{'all':<25}{total_trainable:>15,}{total:>17,}{100 * total_trainable / max(total, 1):>8.3f}%")
    return "\n".join(lines)
