"""What an adapter method is: how it adapts a component, what it trains and saves, which run settings it accepts,
and what the memory planner counts for it. Each method is one subclass in its own module of this package.

A method may declare options of its own (`Option`), given beside the common fields of the component
(`adapters.llm.loraplus_lr_ratio=8`) and kept in `ComponentPolicy.options`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from nvila_ft.adapters.components import get_component, is_quantized
from nvila_ft.errors import UserError


class PolicyError(UserError, ValueError):
    """A policy that cannot work; the message names the component, the field and the fix."""


@dataclass(frozen=True)
class Option:
    """A setting a method declares: its default, its kind (bool, int, float, str) and what it does."""

    default: Any
    kind: type
    help: str

    def accepts(self, value: Any) -> bool:
        if self.kind is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return isinstance(value, self.kind) and not (self.kind is int and isinstance(value, bool))


class Method:
    """One adaptation method (one instance in the registry). The defaults: the method trains tensors of the
    component itself (no PEFT adapter) and keeps its weights as loaded; subclasses change what differs."""

    name = ""
    trains = True
    trains_lora = False  # a PEFT LoRA adapter: saved and loaded as one, disabled for the DPO reference
    quantized_base = False  # the base linears are stored quantized (bitsandbytes / torchao)
    trains_base_weights = False  # whole weight matrices train (a reference model would need a copy)
    options: dict[str, Option] = {}

    @property
    def plain_linears(self) -> bool:
        """The component's linears stay plain and frozen (they may be stored in int8 rows)."""
        return not (self.trains_lora or self.trains_base_weights)

    def option(self, component: Any, key: str) -> Any:
        return component.options.get(key, self.options[key].default)

    # ------------------------------------------------------------------ checks
    def check(self, name: str, component: Any, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        """Raise PolicyError where the component's settings, the model (`model_config`), or the run's precision and
        DeepSpeed settings (a training run's) cannot work with this method."""

    def unknown_option(self, where: str, key: str) -> str | None:
        """The message for a setting this method does not have, where it has one of its own (else a generic one)."""
        return None

    # ------------------------------------------------------------------ loading and applying
    def load_kwargs(self, component: Any, skip: list[str], device_map: Any) -> dict[str, Any]:
        """Arguments of the component's `from_pretrained` (a quantization config); `skip`: modules left unquantized;
        `device_map`: where weights quantized as they load go (None under ZeRO-3, which places and shards them)."""
        return {}

    def apply(self, model: Any, name: str, component: Any) -> None:
        """Make the component trainable as the method says (everything is frozen before)."""
        if is_quantized(get_component(model, name)) and not self.quantized_base:
            raise PolicyError(
                f"adapters.{name}.method = {component.method}, but the {name} is quantized; only qlora and fp8_lora train a quantized base"
            )
        self.adapt(model, name, component)

    def adapt(self, model: Any, name: str, component: Any) -> None:
        pass

    def reference_problem(self, name: str) -> str | None:
        """Why the component's weights with its adapters switched off cannot stand for the DPO reference model."""
        return None

    # ------------------------------------------------------------------ optimizer
    def lr_multiplier(self, component: Any, parameter_name: str, parameter: nn.Parameter) -> float:
        """This parameter's learning rate as a multiple of the component's."""
        return 1.0

    # ------------------------------------------------------------------ memory planner
    def counted_as(self, component: Any) -> Any:
        """The component as the planner's shapes-only model applies it (same trainable tensors, no real weights)."""
        return component

    def stored_linears(self, module: nn.Module, name: str) -> list[nn.Linear]:
        """The base linears the method stores in fewer bits (what bitsandbytes / torchao convert)."""
        return []

    def stored_bytes(self, linear: nn.Linear, component: Any) -> int:
        """Bytes of one stored base linear weight: codes plus quantization constants."""
        return linear.weight.numel() * linear.weight.element_size()

    def storage_word(self, component: Any) -> str:
        return ""

    def quantized_variant(self, component: Any) -> Any:
        """The same adaptation on a 4-bit base (a planner suggestion), or None."""
        return None

