"""Adapter-only artifacts: what a policy trained, saved apart from the base checkpoint.

```
<dir>/adapter_policy.json                           the policy, the base checkpoint, what each folder holds
<dir>/<component>/adapter_config.json               PEFT adapter (lora / dora / qlora / fp8_lora components);
<dir>/<component>/adapter_model.safetensors           the llm one loads with PeftModel onto a plain Qwen2ForCausalLM
<dir>/<component>/trained_weights.safetensors       full / layernorm components: the trained tensors under the
                                                      released checkpoint's key names
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from nvila_ft.adapters.apply import base_module, get_component, set_component
from nvila_ft.adapters.methods import method_of
from nvila_ft.adapters.policy import AdapterPolicy, PolicyError
from nvila_ft.atomic import atomic_directory, write_json
from nvila_ft.model.checkpoint import module_keys, official_keys

POLICY_FILE = "adapter_policy.json"
TRAINED_WEIGHTS = "trained_weights.safetensors"
FORMAT_VERSION = 1


# Where each component sits in the model's state dict.
STATE_PREFIX = {"vision_tower": "vision_tower.model.", "mm_projector": "mm_projector.", "llm": "llm."}


def trained_state(model: Any, name: str, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The trainable tensors of a full / layernorm component, under released-checkpoint key names.

    state_dict: the model's full state dict when parameters live elsewhere (DeepSpeed ZeRO-3 gathers it).
    """
    module = get_component(model, name)
    trainable = [k for k, p in module.named_parameters() if p.requires_grad]
    if state_dict is None:
        values = dict(module.named_parameters())
    else:
        values = {k[len(STATE_PREFIX[name]):]: v for k, v in state_dict.items() if k.startswith(STATE_PREFIX[name])}
    state = {k.replace("base_model.model.", "", 1): values[k].detach().to("cpu").contiguous() for k in trainable}
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise PolicyError(f"{name}: {empty[:3]} are empty shards (DeepSpeed ZeRO-3); gather the parameters before saving")
    return official_keys(name, state)


def save_adapters(
    model: Any,
    policy: AdapterPolicy,
    path: str | os.PathLike,
    overwrite: bool = False,
    extra: dict | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the adapter artifacts of `model` (which went through `apply_policy` with `policy`) atomically.

    state_dict: the model's full state dict, when the parameters themselves are sharded (ZeRO-3).
    """
    contents = {}
    with atomic_directory(path, overwrite=overwrite) as staging:
        for name, component in policy.items():
            method = method_of(component)
            if method.trains_lora:
                sub_state = None
                if state_dict is not None:
                    prefix = STATE_PREFIX[name]
                    sub_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
                method.save_adapter(get_component(model, name), staging / name, sub_state)
                contents[name] = "peft_adapter"
            elif method.trains:
                (staging / name).mkdir()
                tensors = trained_state(model, name, state_dict)
                save_file(tensors, str(staging / name / TRAINED_WEIGHTS), metadata={"format": "pt"})
                contents[name] = "trained_weights"
        write_json(
            staging / POLICY_FILE,
            {
                "format_version": FORMAT_VERSION,
                "policy": policy.to_dict(),
                "base_checkpoint": getattr(model, "name_or_path", None),
                "contents": contents,
                **(extra or {}),
            },
        )
    return Path(path)


def read_policy(path: str | os.PathLike) -> tuple[AdapterPolicy, dict[str, Any]]:
    file = Path(path) / POLICY_FILE
    if not file.is_file():
        raise PolicyError(f"{path}: not an nvila-ft adapter directory (no {POLICY_FILE})")
    meta = json.loads(file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise PolicyError(f"{file}: format_version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return AdapterPolicy.from_dict(meta["policy"]), meta


class AdaptedModel(NamedTuple):
    """A model with saved adapters applied, and the policy they were trained with."""

    model: Any
    policy: AdapterPolicy


def load_adapters(model: Any, path: str | os.PathLike, is_trainable: bool = False) -> AdaptedModel:
    """Apply saved adapters to a freshly loaded base model (quantized bases via `load_for_policy`)."""
    path = Path(path)
    policy, meta = read_policy(path)
    policy.check(model.config)
    model.requires_grad_(False)
    for name, component in policy.items():
        module = get_component(model, name)
        kind = meta["contents"].get(name)
        method = method_of(component)
        if method.trains_lora:
            if kind != "peft_adapter":
                raise PolicyError(f"{path}: the policy adapts {name} with {component.method} but no adapter was saved")
            method.prepare_load(module, name, path)
            adapted = method.load_adapter(module, path / name, is_trainable)
            set_component(model, name, adapted.train(model.training))
        elif method.trains:
            _copy_trained_weights(module, name, path / name / TRAINED_WEIGHTS, is_trainable)
    return AdaptedModel(model, policy)


def _copy_trained_weights(module: Any, name: str, file: Path, trainable: bool) -> None:
    """Copy a component's trained tensors into it (strict on names and shapes)."""
    state = module_keys(name, module, load_file(str(file)))
    params = dict(base_module(module).named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise PolicyError(f"{file}: tensors not in the {name}: {unknown[:5]}")
    for key, value in state.items():
        if params[key].shape != value.shape:
            raise PolicyError(f"{file}: {key} has shape {tuple(value.shape)}, the model's is {tuple(params[key].shape)}")
        with torch.no_grad():
            params[key].copy_(value)
        params[key].requires_grad_(trainable)


def restore_adapter_weights(model: Any, policy: AdapterPolicy, path: str | os.PathLike) -> Any:
    """Load saved adapter values into a model that already went through `apply_policy` with the same policy
    (resume, best checkpoint)."""
    path = Path(path)
    saved, _ = read_policy(path)
    for name, component in policy.items():
        adapter = method_of(component)
        if method_of(getattr(saved, name)) is not adapter:
            raise PolicyError(f"{path}: {name} was saved with method {getattr(saved, name).method}, the model uses {component.method}")
        module = get_component(model, name)
        if adapter.trains_lora:
            adapter.restore_adapter(module, path / name)
        elif adapter.trains:
            _copy_trained_weights(module, name, path / name / TRAINED_WEIGHTS, trainable=True)
    return model
