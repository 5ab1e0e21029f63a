"""Adapter policy as data: for each of `vision_tower`, `mm_projector`, `llm`, how it is adapted.

A policy is plain values (YAML in `adapters/`), checked once at start against the model's config so that
impossible combinations fail before anything heavy happens, with the fix named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from nvila_ft.adapters.methods import REGISTRY, Method, PolicyError, method_of

COMPONENTS = ("vision_tower", "mm_projector", "llm")
METHODS = tuple(REGISTRY)


def option_defaults() -> dict[str, Any]:
    """Every method's options with their defaults. A component that gives another method's option at its default
    says nothing by it: policy files written before methods declared their options hold `rslora` and `dora` on
    every component, and the Hydra node of a policy lists every option (`AdapterPolicy.defaults`)."""
    return {key: option.default for method in REGISTRY.values() for key, option in method.options.items()}


def from_mapping(cls: type, value: Mapping, where: str) -> Any:
    """Build a policy dataclass from a mapping (YAML / DictConfig), naming any unknown key."""
    data = {str(k): v for k, v in value.items() if k != "_target_"}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    return cls(**data)


def component_from_mapping(value: Mapping, where: str) -> "ComponentPolicy":
    """A ComponentPolicy from a mapping whose keys are its fields and its method's own options."""
    data = {str(k): v for k, v in value.items() if k != "_target_"}
    options = dict(data.pop("options", None) or {})
    name = data.get("method", ComponentPolicy.method)
    declared = REGISTRY.get(name, Method()).options
    known = {f.name for f in fields(ComponentPolicy)} - {"options"}
    extra = {k: data.pop(k) for k in list(data) if k not in known}
    unset = option_defaults()
    extra = {k: v for k, v in extra.items() if k in declared or k not in unset or unset[k] != v}
    for key in extra:
        option_error(where, name, key, known | set(declared))
    return ComponentPolicy(**data, options={**options, **extra})


def option_error(where: str, method_name: str, key: str, known: set[str]) -> None:
    """Raise PolicyError for a key that is neither a field nor an option of the component's method."""
    declared = REGISTRY.get(method_name, Method())
    if key in declared.options:
        return
    message = declared.unknown_option(where, key)
    owners = [name for name, other in REGISTRY.items() if key in other.options]
    if message is None and owners:
        message = (f"{where}.{key} is an option of method {' / '.join(owners)}, not {method_name}; set {where}.method "
                   f"to {owners[0]} or leave {key} out")
    raise PolicyError(message or f"{where}: unknown keys {[key]} (known: {sorted(known)})")


@dataclass
class QuantizationPolicy:
    """How a quantized base is stored (method `qlora`: bitsandbytes; `fp8_lora`: torchao float8 weights)."""

    bits: int = 4  # qlora: 4 or 8
    quant_type: str = "nf4"  # 4-bit: nf4 or fp4
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    storage_dtype: str = "uint8"  # 4-bit storage; bfloat16 lets DeepSpeed ZeRO-3 shard the quantized weights

    def check(self, where: str) -> None:
        if self.bits not in (4, 8):
            raise PolicyError(f"{where}.quantization.bits = {self.bits}: bitsandbytes QLoRA uses 4 or 8 bits")
        if self.quant_type not in ("nf4", "fp4"):
            raise PolicyError(f"{where}.quantization.quant_type = {self.quant_type!r}: use 'nf4' or 'fp4'")
        for key in ("compute_dtype", "storage_dtype"):
            if not isinstance(getattr(torch, getattr(self, key), None), torch.dtype):
                raise PolicyError(f"{where}.quantization.{key} = {getattr(self, key)!r} is not a torch dtype")


@dataclass
class ComponentPolicy:
    """How one component is adapted.

    method: one of METHODS (`nvila_ft.adapters.methods`): frozen | layernorm (norm weights only) | lora | dora
            | qlora (LoRA on a bitsandbytes 4/8-bit base) | fp8_lora (LoRA on float8-stored base weights) | full ...
    target_modules: LoRA targets (PEFT suffix names); None = every linear layer of the component that can affect
            the output, as the official code targets them (never lm_head, embeddings or the patch embedding).
    lr / lr_ratio: this component's learning rate, absolute or as a multiple of the base learning rate.
    weight_decay: None = the trainer's weight decay.
    options: the method's own settings (`Method.options`, e.g. `rslora`, `dora` on a quantized base), given in a
            policy file beside the fields above; those not given hold the method's defaults.
    """

    method: str = "frozen"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    lr: float | None = None
    lr_ratio: float | None = None
    weight_decay: float | None = None
    quantization: QuantizationPolicy = field(default_factory=QuantizationPolicy)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.quantization, Mapping):
            self.quantization = from_mapping(QuantizationPolicy, self.quantization, "quantization")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = [str(t) for t in self.target_modules]
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = [str(t) for t in self.exclude_modules]
        declared = REGISTRY.get(self.method, Method()).options
        self.options = {**{k: o.default for k, o in declared.items()}, **{str(k): v for k, v in (self.options or {}).items()}}

    @property
    def trains(self) -> bool:
        return method_of(self).trains

    def learning_rate(self, base_lr: float) -> float:
        if self.lr is not None:
            return float(self.lr)
        return base_lr * (self.lr_ratio if self.lr_ratio is not None else 1.0)

    def to_dict(self) -> dict[str, Any]:
        """The fields and the method's options side by side, as a policy file gives them."""
        data = asdict(self)
        options = data.pop("options")
        return {**data, **options}

    def check(self, name: str, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        """Raise PolicyError for settings that cannot work: the common ones here, the method's own by the method,
        with the model (`model_config`) and a training run's `precision` / `deepspeed` settings when given."""
        where = f"adapters.{name}"
        adapter = REGISTRY.get(self.method)
        if adapter is None:
            raise PolicyError(f"{where}.method = {self.method!r}; choose one of {', '.join(METHODS)}")
        for key, value in self.options.items():
            option_error(where, self.method, key, set(adapter.options))
            if not adapter.options[key].accepts(value):
                raise PolicyError(f"{where}.{key} = {value!r}: expected a {adapter.options[key].kind.__name__} ({adapter.options[key].help})")
        adapter.check(name, self, model_config, precision, deepspeed)
        if self.lr is not None and self.lr_ratio is not None:
            raise PolicyError(f"{where}: give lr or lr_ratio, not both")
        for key in ("lr", "lr_ratio", "weight_decay"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise PolicyError(f"{where}.{key} = {value}: must be >= 0")
        if adapter.trains and self.learning_rate(1.0) == 0:
            raise PolicyError(f"{where}: method {self.method} with a zero learning rate trains nothing; use method: frozen")


@dataclass
class AdapterPolicy:
    """One ComponentPolicy per NVILA component. Defaults follow the official fine-tuning recipe: projector full."""

    vision_tower: ComponentPolicy = field(default_factory=ComponentPolicy)
    mm_projector: ComponentPolicy = field(default_factory=lambda: ComponentPolicy(method="full"))
    llm: ComponentPolicy = field(default_factory=lambda: ComponentPolicy(method="lora"))
    name: str | None = None

    def __post_init__(self) -> None:
        for component in COMPONENTS:
            value = getattr(self, component)
            if isinstance(value, Mapping):
                setattr(self, component, component_from_mapping(value, f"adapters.{component}"))
            elif value is None:
                setattr(self, component, ComponentPolicy())

    def items(self) -> list[tuple[str, ComponentPolicy]]:
        return [(c, getattr(self, c)) for c in COMPONENTS]

    def to_dict(self) -> dict[str, Any]:
        return {**{name: component.to_dict() for name, component in self.items()}, "name": self.name}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting a policy file can give, with its default: each component's fields and every method's
        options (the command line's `adapters.<component>.<key>=...` then needs no `+`)."""
        data = cls().to_dict()
        others = option_defaults()
        return {**{name: data[name] | {k: v for k, v in others.items() if k not in data[name]} for name in COMPONENTS},
                "name": data["name"]}

    @classmethod
    def from_yaml(cls, path: str) -> "AdapterPolicy":
        """A policy file of `adapters/` (or your own), without Hydra."""
        import yaml

        with open(path) as handle:
            return cls.from_dict(yaml.safe_load(handle))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterPolicy":
        return from_mapping(cls, data, "adapters")

    def check(self, model_config: Any = None, precision: Any = None, deepspeed: Any = None) -> None:
        """Raise PolicyError for a policy that cannot run: on this model (`model_config`, when given) and, for a
        training run, with its `precision` and `deepspeed` settings. The one place a policy is checked: at the
        start of a run, before any weight is touched, and when it is applied to a model."""
        for name, policy in self.items():
            policy.check(name, model_config, precision, deepspeed)
        if not any(policy.trains for _, policy in self.items()):
            raise PolicyError("the adapter policy trains nothing: every component is frozen")
