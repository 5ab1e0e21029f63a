"""FP8 compute (`precision.fp8`): the LLM's linear layers multiply in float8 through torchao's `Float8Linear`.

A `Float8Linear` keeps its weight as it was (bf16 or fp32, trainable or frozen) and, on every call, casts the
input, the weight and the output gradient to float8 with dynamic scales (one per tensor: "tensorwise"; one per
row: "rowwise") before each of the three matmuls of a linear layer. State-dict keys and dtypes are therefore
those of the 16-bit model: checkpoints, adapters and merged exports do not change.

What is converted: every `nn.Linear` of the LLM whose in and out features are multiples of 16 (float8 GEMM shape
rule), never `lm_head`, never the vision tower or projector. Under a LoRA policy the frozen `base_layer` inside
each PEFT LoRA layer is converted and LoRA A/B stay in their own dtype; under full fine-tuning the linear itself.

On a CPU, `torch._scaled_mm` has a kernel of its own, so the same torchao code runs with the same numerics as its
emulation (`emulate=True`: dequantize, then a float32 matmul); tests compare both with bf16.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvila_ft.atomic import atomic_write_bytes
from nvila_ft.training.config import FP8_RECIPES

RECIPES = FP8_RECIPES
FP8_LAYERS_FILE = "fp8_layers.txt"
SHAPE_MULTIPLE = 16  # float8 GEMMs need both dimensions of the weight to be multiples of 16


@dataclass(frozen=True)
class Float8Conversion:
    """What `convert_llm_to_float8` did, with module names as in the checkpoint (`llm.model.layers.0...`)."""

    recipe: str
    converted: list[str]
    kept: dict[str, str]  # linears left in high precision -> why

    def summary(self) -> str:
        total = len(self.converted) + len(self.kept)
        return f"fp8 compute: {len(self.converted)} of {total} LLM linears converted ({self.recipe})"

    def write(self, run_dir: str | Path) -> Path:
        """`<run_dir>/fp8_layers.txt`: the converted layers, one a line."""
        path = Path(run_dir) / FP8_LAYERS_FILE
        atomic_write_bytes(path, "".join(f"{name}\n" for name in self.converted).encode())
        return path


def float8_config(recipe: str) -> Any:
    """torchao's recipe with the inner dimension padded, so token counts need not be multiples of 16."""
    from torchao.float8 import Float8LinearConfig

    if recipe not in RECIPES:
        raise ValueError(f"fp8 recipe {recipe!r}; use one of {', '.join(RECIPES)}")
    return dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), pad_inner_dim=True)


def plain_name(name: str) -> str:
    """A module name inside the LLM without PEFT's wrappers: `model.layers.0.self_attn.q_proj`."""
    return name.replace("base_model.model.", "", 1).replace(".base_layer", "")


def _why_kept(name: str, module: nn.Linear) -> str | None:
    if name.rsplit(".", 1)[-1] == "lm_head" or name.endswith("lm_head.base_layer"):
        return "output head"
    if module.in_features % SHAPE_MULTIPLE or module.out_features % SHAPE_MULTIPLE:
        return f"shape {module.out_features}x{module.in_features} is not a multiple of {SHAPE_MULTIPLE}"
    return None


def _llm_linears(llm: nn.Module) -> dict[str, nn.Linear]:
    """The LLM's linears that do the model's own work: not PEFT's LoRA A/B (nor DoRA's magnitude)."""
    return {
        name: module
        for name, module in llm.named_modules()
        if isinstance(module, nn.Linear) and not any(part.startswith("lora_") for part in name.split("."))
    }


def convert_llm_to_float8(model: Any, recipe: str = "tensorwise") -> Float8Conversion:
    """Swap the LLM's eligible linears for torchao `Float8Linear` in place (after `apply_policy` / `load_adapters`)."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    llm = model.llm
    linears = _llm_linears(llm)
    kept = {plain_name(n): why for n, m in linears.items() if (why := _why_kept(n, m)) is not None}
    convert_to_float8_training(
        llm,
        module_filter_fn=lambda module, name: name in linears and _why_kept(name, module) is None,
        config=float8_config(recipe),
    )
    converted = [name for name, module in llm.named_modules() if isinstance(module, Float8Linear)]
    for name in converted:
        llm.get_submodule(name).register_forward_pre_hook(_cpu_autocast_input)
    return Float8Conversion(recipe, [f"llm.{plain_name(n)}" for n in converted], {f"llm.{n}": why for n, why in kept.items()})


def _cpu_autocast_input(module: nn.Module, args: tuple) -> tuple | None:
    """Under CPU autocast, hand the layer its input in the autocast dtype, as torchao itself does under CUDA autocast."""
    if args and torch.is_autocast_enabled("cpu") and args[0].is_floating_point() and args[0].device.type == "cpu":
        return (args[0].to(torch.get_autocast_dtype("cpu")), *args[1:])
    return None


def has_float8_compute(model: nn.Module) -> bool:
    return any(type(m).__name__ == "Float8Linear" for m in model.modules())
