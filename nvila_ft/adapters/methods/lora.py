"""`lora`: a PEFT LoRA adapter on the component's linear layers; also the base of the LoRA family (dora, qlora,
fp8_lora, ...), which differ in the PEFT config, in how the base is stored and in what they save."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from nvila_ft.adapters.components import get_component, linear_names, set_component
from nvila_ft.adapters.methods.base import Method, Option, PolicyError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_targets(model: Any, name: str, component: Any) -> dict[str, Any]:
    """PEFT targeting for a component: the policy's targets, or every linear the official recipe adapts."""
    if component.target_modules is not None:
        return {"target_modules": component.target_modules}
    module = get_component(model, name)
    if name == "llm":
        return {"target_modules": sorted({n.rsplit(".", 1)[-1] for n in linear_names(module)} - {"lm_head"})}
    if name == "vision_tower":
        layers = model.vision_tower.used_layers()
        suffixes = {n.rsplit(".", 1)[-1] for layer in layers for n in linear_names(layer)}
        return {
            "target_modules": sorted(suffixes),
            "layers_to_transform": list(range(model.vision_tower.num_layers_used)),
            "layers_pattern": "layers",
        }
    return {"target_modules": linear_names(module)}


def check_targets(module: nn.Module, name: str, component: Any) -> None:
    """Every named LoRA target must be a module of the component (PEFT matches names by suffix); the error
    lists what can be targeted. A regular expression (a string) is left to PEFT."""
    if component.target_modules is None or isinstance(component.target_modules, str):
        return
    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and n]
    missing = [t for t in component.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        valid = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise PolicyError(
            f"adapters.{name}.target_modules: {', '.join(map(repr, missing))} matches no layer of the {name}; "
            f"valid names: {', '.join(valid)}"
        )


class Lora(Method):
    name = "lora"
    trains_lora = True
    options = {"rslora": Option(False, bool, "scale the update by alpha / sqrt(r) (rsLoRA) instead of alpha / r")}

    def check(self, name: str, component: Any, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        where = f"adapters.{name}"
        if component.r < 1:
            raise PolicyError(f"{where}.r = {component.r}: the LoRA rank must be >= 1")
        if component.alpha <= 0:
            raise PolicyError(f"{where}.alpha = {component.alpha}: must be > 0")
        if not 0 <= component.dropout < 1:
            raise PolicyError(f"{where}.dropout = {component.dropout}: must be in [0, 1)")
        if name == "mm_projector" and model_config is not None and model_config.projector_type == "identity":
            raise PolicyError("adapters.mm_projector uses LoRA but the identity projector has no linear layer")

    def unknown_option(self, where: str, key: str) -> str | None:
        if key == "dora":
            return f"{where}.dora applies to qlora/fp8_lora; for a 16-bit base use method: dora"
        return None

    # ------------------------------------------------------------------ applying
    def peft_options(self, component: Any) -> dict[str, Any]:
        """The LoraConfig arguments that make this method what it is."""
        return {"use_rslora": self.option(component, "rslora")}

    def peft_config(self, model: Any, name: str, component: Any) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=component.r,
            lora_alpha=component.alpha,
            lora_dropout=component.dropout,
            exclude_modules=component.exclude_modules,
            task_type="CAUSAL_LM" if name == "llm" else None,
            **lora_targets(model, name, component),
            **self.peft_options(component),
        )

    def prepare_base(self, model: Any, name: str, component: Any) -> None:
        """Change how the base is stored before PEFT wraps it (fp8_lora)."""

    def adapt(self, model: Any, name: str, component: Any) -> None:
        from peft import get_peft_model

        module = get_component(model, name)
        check_targets(module, name, component)
        config = self.peft_config(model, name, component)
        self.prepare_base(model, name, component)
        try:
            with warnings.catch_warnings():
                # PEFT warns that its own merge cannot re-quantize float8 bases; nvila-ft merges into a rebuilt base
                warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
                wrapped = get_peft_model(module, config)
        except ValueError as err:
            raise PolicyError(f"adapters.{name}: {err}") from err
        set_component(model, name, wrapped.train(model.training))  # PEFT leaves the wrapper in train mode
        self.after_wrap(wrapped, component)

    def after_wrap(self, wrapped: nn.Module, component: Any) -> None:
        """What the method keeps of the freshly initialised adapter (PiSSA: its initial values)."""

    # ------------------------------------------------------------------ artifacts
    def save_adapter(self, module: nn.Module, folder: Path, state_dict: dict | None) -> None:
        module.save_pretrained(str(folder), state_dict=state_dict)

    def prepare_load(self, module: nn.Module, name: str, path: Path) -> None:
        """Before a saved adapter is loaded onto a fresh base: refuse or convert a base that does not fit."""

    def load_adapter(self, module: nn.Module, folder: Path, is_trainable: bool) -> nn.Module:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            return PeftModel.from_pretrained(module, str(folder), is_trainable=is_trainable)

    def restore_adapter(self, module: nn.Module, folder: Path) -> None:
        """Saved adapter values into a component that carries the same adapter (resume, best checkpoint)."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, load_file(str(folder / ADAPTER_WEIGHTS)))
        if getattr(result, "unexpected_keys", None):
            raise PolicyError(f"{folder}: adapter tensors not in the model: {result.unexpected_keys[:5]}")

    # ------------------------------------------------------------------ planner
    def quantized_variant(self, component: Any) -> Any:
        return dataclasses.replace(component, method="qlora")
