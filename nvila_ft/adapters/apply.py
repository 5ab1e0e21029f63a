"""Turning an AdapterPolicy into PEFT / bitsandbytes / torchao calls on an NVILA model.

Each component gets its own PEFT adapter (own method, rank and targets), so the LLM adapter is a standard
PEFT adapter of a plain `Qwen2ForCausalLM` and the vision adapter one of a plain `SiglipVisionModel`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nvila_ft.adapters.policy import AdapterPolicy, ComponentPolicy, PolicyError


# ------------------------------------------------------------------ components
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


# ------------------------------------------------------------------ loading with quantized bases
def bitsandbytes_config(policy: ComponentPolicy, skip_modules: list[str] | None = None) -> Any:
    from transformers import BitsAndBytesConfig

    q = policy.quantization
    return BitsAndBytesConfig(
        load_in_4bit=q.bits == 4,
        load_in_8bit=q.bits == 8,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, q.storage_dtype),
        llm_int8_skip_modules=skip_modules,
    )


def float8_on_load(policy: ComponentPolicy) -> Any:
    """transformers' torchao quantization for an fp8_lora component whose LoRA targets are the default ones (every
    linear of the component but lm_head): each weight is stored in float8 as it loads, so the whole 16-bit base is
    never in memory at once. None for other targets (then `quantize_float8` converts them after loading)."""
    if policy.method != "fp8_lora" or policy.target_modules is not None or policy.exclude_modules:
        return None
    from torchao.quantization import Float8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Float8WeightOnlyConfig(), modules_to_not_convert=["lm_head"])


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
    kwargs: dict[str, dict[str, Any]] = {"llm": {}, "vision_tower": {}}
    for name, skip in (("llm", ["lm_head"]), ("vision_tower", ["head"])):
        component = getattr(policy, name)
        if component.method == "qlora":
            kwargs[name] = {"quantization_config": bitsandbytes_config(component, skip)}
            if not is_deepspeed_zero3_enabled():  # ZeRO-3 places (and shards) the weights itself
                kwargs[name]["device_map"] = placement
        elif float8_on_load(component) is not None:  # (fp8_lora is refused under ZeRO-3)
            kwargs[name] = {"quantization_config": float8_on_load(component), "device_map": placement}
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


# ------------------------------------------------------------------ targets
def linear_names(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def lora_targets(model: Any, name: str, policy: ComponentPolicy) -> dict[str, Any]:
    """PEFT targeting for a component: the policy's targets, or every linear the official recipe adapts."""
    if policy.target_modules is not None:
        return {"target_modules": policy.target_modules}
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


def check_targets(module: nn.Module, name: str, policy: ComponentPolicy) -> None:
    """Every named LoRA target must be a module of the component (PEFT matches names by suffix); the error
    lists what can be targeted. A regular expression (a string) is left to PEFT."""
    if policy.target_modules is None or isinstance(policy.target_modules, str):
        return
    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and n]
    missing = [t for t in policy.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        valid = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise PolicyError(
            f"adapters.{name}.target_modules: {', '.join(map(repr, missing))} matches no layer of the {name}; "
            f"valid names: {', '.join(valid)}"
        )


def lora_config(model: Any, name: str, policy: ComponentPolicy) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=policy.r,
        lora_alpha=policy.alpha,
        lora_dropout=policy.dropout,
        use_rslora=policy.rslora,
        use_dora=policy.use_dora,
        exclude_modules=policy.exclude_modules,
        task_type="CAUSAL_LM" if name == "llm" else None,
        **lora_targets(model, name, policy),
    )


def quantize_float8(module: nn.Module, targets: dict[str, Any]) -> None:
    """Store the targeted linears' weights in float8 (e4m3, per-row scales) with torchao; compute stays 16-bit."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    from nvila_ft.adapters.float8_weights import keep_float8_for_backward
    from peft import LoraConfig

    config = LoraConfig(**targets)
    chosen = lambda m, fqn: isinstance(m, nn.Linear) and bool(check_target_module_exists(config, fqn))  # noqa: E731
    if not is_quantized(module):  # (a base quantized as it loaded, `float8_on_load`, is already)
        quantize_(module, Float8WeightOnlyConfig(), filter_fn=chosen)
    for name, linear in module.named_modules():
        if isinstance(linear, nn.Linear) and hasattr(linear.weight, "dequantize") and chosen(linear, name):
            keep_float8_for_backward(linear)  # no 16-bit copy of each weight held until backward


# ------------------------------------------------------------------ application
def norm_parameters(module: nn.Module, within: list[nn.Module] | None = None) -> list[nn.Parameter]:
    """Parameters of normalisation layers (LayerNorm / RMSNorm); with `within`, only those inside those modules."""
    allowed = None if within is None else {id(p) for m in within for p in m.parameters()}
    found = []
    for sub in module.modules():
        if "norm" in type(sub).__name__.lower():
            found += [p for p in sub.parameters(recurse=False) if allowed is None or id(p) in allowed]
    return found


def _apply_component(model: Any, name: str, policy: ComponentPolicy) -> None:
    module = get_component(model, name)
    where = f"adapters.{name}"
    if policy.method == "qlora" and not is_quantized(module):
        raise PolicyError(
            f"{where}.method = qlora, but the {name} was loaded in 16 bits; load the model with "
            "nvila_ft.adapters.load_for_policy (or a quantization_config) so the base is quantized on load"
        )
    if policy.method not in ("qlora", "fp8_lora") and is_quantized(module):
        raise PolicyError(f"{where}.method = {policy.method}, but the {name} is quantized; only qlora and fp8_lora train a quantized base")
    used = model.vision_tower.used_layers() if name == "vision_tower" else None
    if policy.method == "full":
        module.requires_grad_(True)
        if name == "vision_tower":
            for param_name, param in model.vision_tower.named_parameters():
                if param_name in set(model.vision_tower.unused_parameter_names()):
                    param.requires_grad_(False)
    elif policy.method == "layernorm":
        params = norm_parameters(module, used)
        if not params:
            raise PolicyError(f"{where}.method = layernorm, but the {name} has no normalisation layer")
        for param in params:
            param.requires_grad_(True)
    elif policy.uses_lora:
        from peft import get_peft_model

        check_targets(module, name, policy)
        config = lora_config(model, name, policy)
        if policy.method == "fp8_lora":
            quantize_float8(module, lora_targets(model, name, policy))
        try:
            with warnings.catch_warnings():
                # PEFT warns that its own merge cannot re-quantize float8 bases; nvila-ft merges into a rebuilt base
                warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
                wrapped = get_peft_model(module, config)
        except ValueError as err:
            raise PolicyError(f"{where}: {err}") from err
        set_component(model, name, wrapped.train(model.training))  # PEFT leaves the wrapper in train mode


def apply_policy(model: Any, policy: AdapterPolicy) -> Any:
    """Freeze everything, then make each component trainable as its policy says. Returns the model."""
    policy.check(model.config)
    model.requires_grad_(False)
    for name, component in policy.items():
        _apply_component(model, name, component)
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
