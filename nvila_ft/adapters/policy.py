"""Adapter policy as data: for each of `vision_tower`, `mm_projector`, `llm`, how it is adapted.

A policy is plain values (YAML in `adapters/`), checked once at start against the model's config so that
impossible combinations fail before anything heavy happens, with the fix named.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from nvila_ft.errors import UserError

COMPONENTS = ("vision_tower", "mm_projector", "llm")
METHODS = ("frozen", "layernorm", "lora", "dora", "qlora", "fp8_lora", "full")
LORA_METHODS = ("lora", "dora", "qlora", "fp8_lora")
QUANTIZED_METHODS = ("qlora", "fp8_lora")


class PolicyError(UserError, ValueError):
    """A policy that cannot work; the message names the component, the field and the fix."""


def from_mapping(cls: type, value: Mapping, where: str) -> Any:
    """Build a policy dataclass from a mapping (YAML / DictConfig), naming any unknown key."""
    data = {str(k): v for k, v in value.items() if k != "_target_"}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PolicyError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    return cls(**data)


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

    method: frozen | layernorm (norm weights only) | lora | dora | qlora (LoRA on a bitsandbytes 4/8-bit base)
            | fp8_lora (LoRA on float8-stored base weights) | full.
    target_modules: LoRA targets (PEFT suffix names); None = every linear layer of the component that can affect
            the output, as the official code targets them (never lm_head, embeddings or the patch embedding).
    lr / lr_ratio: this component's learning rate, absolute or as a multiple of the base learning rate.
    weight_decay: None = the trainer's weight decay.
    """

    method: str = "frozen"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    rslora: bool = False
    dora: bool = False  # DoRA on a quantized base (qlora / fp8_lora); method "dora" is the 16-bit case
    lr: float | None = None
    lr_ratio: float | None = None
    weight_decay: float | None = None
    quantization: QuantizationPolicy = field(default_factory=QuantizationPolicy)

    def __post_init__(self) -> None:
        if isinstance(self.quantization, Mapping):
            self.quantization = from_mapping(QuantizationPolicy, self.quantization, "quantization")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            self.target_modules = [str(t) for t in self.target_modules]
        if self.exclude_modules is not None and not isinstance(self.exclude_modules, str):
            self.exclude_modules = [str(t) for t in self.exclude_modules]

    @property
    def uses_lora(self) -> bool:
        return self.method in LORA_METHODS

    @property
    def use_dora(self) -> bool:
        return self.method == "dora" or (self.method in QUANTIZED_METHODS and self.dora)

    @property
    def trains(self) -> bool:
        return self.method != "frozen"

    def learning_rate(self, base_lr: float) -> float:
        if self.lr is not None:
            return float(self.lr)
        return base_lr * (self.lr_ratio if self.lr_ratio is not None else 1.0)

    def check(self, name: str) -> None:
        where = f"adapters.{name}"
        if self.method not in METHODS:
            raise PolicyError(f"{where}.method = {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.uses_lora:
            if self.r < 1:
                raise PolicyError(f"{where}.r = {self.r}: the LoRA rank must be >= 1")
            if self.alpha <= 0:
                raise PolicyError(f"{where}.alpha = {self.alpha}: must be > 0")
            if not 0 <= self.dropout < 1:
                raise PolicyError(f"{where}.dropout = {self.dropout}: must be in [0, 1)")
        if self.dora and self.method not in QUANTIZED_METHODS:
            raise PolicyError(f"{where}.dora applies to qlora/fp8_lora; for a 16-bit base use method: dora")
        if self.method == "qlora":
            self.quantization.check(where)
        if self.method == "fp8_lora" and importlib.util.find_spec("torchao") is None:
            raise PolicyError(f"{where}.method = fp8_lora stores weights in float8 with torchao: pip install torchao")
        if self.lr is not None and self.lr_ratio is not None:
            raise PolicyError(f"{where}: give lr or lr_ratio, not both")
        for key in ("lr", "lr_ratio", "weight_decay"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise PolicyError(f"{where}.{key} = {value}: must be >= 0")
        if self.trains and self.learning_rate(1.0) == 0:
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
                setattr(self, component, from_mapping(ComponentPolicy, value, f"adapters.{component}"))
            elif value is None:
                setattr(self, component, ComponentPolicy())

    def items(self) -> list[tuple[str, ComponentPolicy]]:
        return [(c, getattr(self, c)) for c in COMPONENTS]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_yaml(cls, path: str) -> "AdapterPolicy":
        """A policy file of `adapters/` (or your own), without Hydra."""
        import yaml

        with open(path) as handle:
            return cls.from_dict(yaml.safe_load(handle))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterPolicy":
        return from_mapping(cls, data, "adapters")

    def check(self, model_config: Any = None) -> None:
        """Raise PolicyError for a policy that cannot run on this model; called before any weight is touched."""
        for name, policy in self.items():
            policy.check(name)
        if not any(policy.trains for _, policy in self.items()):
            raise PolicyError("the adapter policy trains nothing: every component is frozen")
        projector = self.mm_projector
        if projector.method in QUANTIZED_METHODS:
            raise PolicyError(
                f"adapters.mm_projector.method = {projector.method}: the projector is small and trained in full in every "
                "official recipe; quantizing it saves nothing. Use method: full (or lora)"
            )
        if model_config is not None:
            if projector.method == "layernorm" and model_config.stc_factor == 1:
                raise PolicyError(
                    f"adapters.mm_projector.method = layernorm, but the {model_config.projector_type!r} projector has no "
                    "LayerNorm; use full or frozen"
                )
            if projector.uses_lora and model_config.projector_type == "identity":
                raise PolicyError("adapters.mm_projector uses LoRA but the identity projector has no linear layer")
