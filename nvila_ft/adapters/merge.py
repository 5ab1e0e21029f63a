"""Merging adapters into plain weights and exporting a verified NVILA checkpoint.

LoRA/DoRA deltas are merged by PEFT. A quantized base (qlora / fp8_lora) is first rebuilt in 16 bits,
either from its dequantized weights (the model that was trained) or from the original checkpoint weights
(`qlora_merge="original"`), then wrapped with the same adapter and merged. Export compares the merged
model's logits on a probe batch with those of the adapted model as it was trained, allowing a quantized base the
gap that dequantizing it introduces, and writes nothing if they disagree. A model trained with FP8 compute
(`precision.fp8`) kept its weights in 16 bits: it is merged and checked with 16-bit matmuls, and the gap to its
float8 logits is reported beside the check.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nvila_ft.adapters.apply import base_module, get_component, is_quantized, set_component
from nvila_ft.adapters.float8_weights import restore_linears
from nvila_ft.adapters.frozen_storage import restore_frozen_storage
from nvila_ft.errors import UserError
from nvila_ft.model.checkpoint import load_llm, load_vision_tower, resolve_checkpoint
from nvila_ft.model.vision_tower import drop_unused

MERGE_MODES = ("dequantized", "original")


class ExportError(UserError, RuntimeError):
    """The merged model does not reproduce the adapted one; nothing was written."""


def int8_row_scales(module: nn.Module) -> torch.Tensor | None:
    """The absmax row scales of a bitsandbytes 8-bit linear, wherever bitsandbytes keeps them: on the weight
    (`weight.SCB`) until the first forward pass, then on the layer (`state.SCB`)."""
    scales = getattr(getattr(module, "weight", None), "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    return scales


def dequantize(tensor: torch.Tensor, dtype: torch.dtype, row_scales: torch.Tensor | None = None) -> torch.Tensor:
    """A plain copy of a bitsandbytes 4/8-bit or torchao float8 weight (plain tensors are just cast).

    row_scales: an 8-bit weight's scales when they are not on the tensor (see `int8_row_scales`); an int8
    weight without any is an error, never a cast of its raw codes.
    """
    if getattr(tensor, "quant_state", None) is not None:  # bitsandbytes 4-bit, packed
        import bitsandbytes.functional as bnb_functional

        data, state = tensor.data, tensor.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for bitsandbytes' CPU inference kernel
            data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, state)
        return bnb_functional.dequantize_4bit(data, state).to(dtype)
    if tensor.dtype == torch.int8:  # bitsandbytes 8-bit: int8 rows with absmax scales
        scales = row_scales if row_scales is not None else getattr(tensor, "SCB", None)
        if scales is None:
            raise ExportError(f"an int8 weight {tuple(tensor.shape)} has no row scales; its raw codes are not weights")
        return (tensor.data.float() * scales.float()[:, None] / 127.0).to(dtype)
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "dequantize"):  # torchao subclass
        return tensor.dequantize().to(dtype)
    return tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach().clone()


def plain_base_state(peft_module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """State of the model under a PEFT wrapper: no adapter tensors, dequantized, with plain key names."""
    base = base_module(peft_module)
    # state_dict (not named_parameters) so that bitsandbytes unpacks CPU-repacked 4-bit weights; its extra
    # quantization-statistics entries are left out by keeping only real parameter and buffer names
    tensors = {name for name, _ in base.named_parameters()} | {name for name, _ in base.named_buffers()}
    scales = {f"{name}.weight": int8_row_scales(m) for name, m in base.named_modules() if name}
    return {
        name.replace(".base_layer.", "."): dequantize(tensor, dtype, scales.get(name))
        for name, tensor in base.state_dict(keep_vars=True).items()
        if name in tensors and "lora_" not in name
    }


def _empty_model(cls: type, config: Any) -> nn.Module:
    """`cls(config)` without spending time on random initialisation."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5.20
        from transformers.modeling_utils import no_init_weights
    config = copy.deepcopy(config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    with no_init_weights():
        return cls(config)


def sixteen_bit_base(model: Any, name: str, mode: str, dtype: torch.dtype) -> nn.Module:
    """An unquantized copy of a component's base: its dequantized weights, or the original checkpoint's."""
    module = get_component(model, name)
    device = next(module.parameters()).device
    if mode == "original":
        if name not in ("llm", "vision_tower"):
            raise ExportError(f"{name} has no quantized base to restore from the checkpoint")
        root = Path(resolve_checkpoint(model.name_or_path))
        return (load_llm if name == "llm" else load_vision_tower)(root, dtype).to(device)
    base = base_module(module)
    fresh = _empty_model(type(base), base.config)
    if name == "vision_tower" and not hasattr(getattr(base, "vision_model", base), "post_layernorm"):
        drop_unused(fresh, model.vision_tower.num_layers_used)  # the base was loaded without its unused weights
    state = plain_base_state(module, dtype)
    check_against_checkpoint(state, name, getattr(model, "name_or_path", None))
    result = fresh.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight" or not fresh.config.tie_word_embeddings]
    if missing or result.unexpected_keys:
        raise ExportError(f"cannot rebuild the {name} base: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return fresh.to(device=device, dtype=dtype)


# Largest |dequantized - checkpoint| allowed, as a share of the tensor's largest checkpoint value. NF4/FP4 blocks
# round to within about 0.15 of their absmax and int8 rows within 1/254 of theirs; raw codes are far outside.
DEQUANTIZATION_LIMIT = 0.25


def check_against_checkpoint(state: dict[str, torch.Tensor], name: str, checkpoint: str | None) -> None:
    """Compare a dequantized base with the 16-bit weights of the checkpoint it was quantized from, tensor by tensor
    (read from disk one at a time), so that a wrong dequantization can never be merged and exported. Nothing to
    compare when the checkpoint folder is not on disk."""
    folder = Path(checkpoint or "") / name
    if not checkpoint or not (folder / "config.json").is_file():
        return
    from nvila_ft.model.checkpoint import iter_safetensors, official_keys

    by_key = {official: local for local, official in zip(state, official_keys(name, dict.fromkeys(state)))}
    for key, original in iter_safetensors(folder):
        local = by_key.get(key)
        if local is None or not original.is_floating_point():
            continue
        rebuilt, original = state[local].float().cpu(), original.float()
        scale = float(original.abs().max()) or 1.0
        error = float((rebuilt - original).abs().max()) / scale if rebuilt.shape == original.shape else float("inf")
        if error > DEQUANTIZATION_LIMIT:
            raise ExportError(
                f"the dequantized {name} weight {local} differs from the checkpoint's ({folder}) by {error:.3g} of its "
                f"largest value (limit {DEQUANTIZATION_LIMIT}); nothing was written"
            )


def rewrap(model: Any, name: str, base: nn.Module) -> nn.Module:
    """`base` with the component's adapter (same config, same weights), not merged."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    module = get_component(model, name)
    adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(module).items()}
    wrapped = get_peft_model(base, copy.deepcopy(module.peft_config["default"]))
    set_peft_model_state_dict(wrapped, adapter)
    return wrapped.train(module.training)


@contextlib.contextmanager
def sixteen_bit_layers(model: Any, bases: dict[str, nn.Module]) -> Iterator[None]:
    """Within the block, each quantized layer of these components is, in place, the same layer of its 16-bit base
    (`sixteen_bit_base`): the trained adapter tensors themselves then act on the weights the merge goes into,
    with nothing copied or re-wrapped. The quantized layers are put back on exit."""
    swapped = []
    try:
        for name, base in bases.items():
            wrapped = base_module(get_component(model, name))
            for layer_name, layer in list(wrapped.named_modules()):
                if not layer_name or next(layer.children(), None) is not None or not is_quantized(layer):
                    continue
                parent_name, _, attribute = layer_name.rpartition(".")
                parent = wrapped.get_submodule(parent_name)
                setattr(parent, attribute, base.get_submodule(layer_name.replace(".base_layer", "")))
                swapped.append((parent, attribute, layer))
        yield
    finally:
        for parent, attribute, layer in reversed(swapped):
            setattr(parent, attribute, layer)


def merge_adapters(model: Any, qlora_merge: str = "dequantized") -> Any:
    """Replace every PEFT-wrapped component by its merged plain module (in place) and return the model.

    A quantized base is first rebuilt in the model's dtype: "dequantized" from its own weights (exactly the
    model that was trained), "original" from the 16-bit checkpoint (`model.name_or_path`).
    """
    if qlora_merge not in MERGE_MODES:
        raise ValueError(f"qlora_merge must be one of {MERGE_MODES}, got {qlora_merge!r}")
    restore_linears(model)  # a merged model computes in its own dtype, also after FP8-compute training
    restore_frozen_storage(model)  # the checkpoint's own 16-bit tensors where the run kept int8 / host copies
    for name in ("vision_tower", "mm_projector", "llm"):
        module = get_component(model, name)
        if not hasattr(module, "merge_and_unload"):
            continue
        if is_quantized(module):
            module = rewrap(model, name, sixteen_bit_base(model, name, qlora_merge, model.dtype))
        set_component(model, name, module.merge_and_unload())
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class ExportReport:
    path: Path | None
    max_abs_diff: float
    tolerance: float  # the largest difference allowed: the export dtype's, plus a quantized base's gap
    reference: str  # what the merged logits were compared with
    # how far the model as trained is from its 16-bit counterpart: for a quantized base, the trained adapters on the
    # 16-bit base (part of the tolerance); for FP8 compute, the merged model from the float8 logits (reported only)
    quantization_gap: float | None = None


DEFAULT_RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def quantized_components(model: Any) -> list[str]:
    """The components whose adapter sits on a quantized base."""
    return [name for name in ("vision_tower", "mm_projector", "llm")
            if hasattr(get_component(model, name), "merge_and_unload") and is_quantized(get_component(model, name))]


def sixteen_bit_gap(model: Any, probe: dict[str, torch.Tensor], reference: torch.Tensor, quantized: list[str], mode: str) -> float | None:
    """How far the trained adapters on the 16-bit bases of the `quantized` components are from the model as trained
    (`reference` logits), then those components re-wrapped on their 16-bit bases, ready to merge; None when none.

    The bound for a quantized base. T: the reference logits (the model as trained); D: the same adapter modules, not
    a copy, with each quantized layer swapped for the 16-bit layer the merge goes into; M: the merged model.
    |M - T| <= |M - D| + |D - T|. |M - D| is the merge's own rounding in the export dtype (`tolerance`). |D - T| is
    measured here: exactly what dequantizing the base changes on this probe (the quantized kernels' compute
    rounding: activations to bfloat16 or int8 rows, weights to the compute dtype; with qlora_merge="original" also
    the weights' quantization error). D holds nothing that re-wrapping rebuilt, so an adapter tensor lost or
    altered on the way to M (a DoRA magnitude, a scaling) moves M alone and shows in full.
    """
    if not quantized:
        return None
    bases = {name: sixteen_bit_base(model, name, mode, model.dtype) for name in quantized}
    with sixteen_bit_layers(model, bases):
        gap = float((model(**probe).logits.float() - reference).abs().max())
    for name, base in bases.items():
        set_component(model, name, rewrap(model, name, base))
    return gap


@torch.no_grad()
def export_merged(
    model: Any,
    path: str | os.PathLike,
    probe: dict[str, torch.Tensor],
    qlora_merge: str = "dequantized",
    dtype: torch.dtype | None = None,
    tolerance: float | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Merge, compare the merged model with the adapted model as it was trained on `probe`, then save the official
    layout.

    Where a base is quantized the merged model cannot equal the trained one: it computes on the 16-bit base
    (dequantized or original) without the quantized kernels' rounding. That gap is measured on the probe, with the
    trained adapter tensors themselves on the 16-bit base (`sixteen_bit_layers`), and allowed on top of the
    tolerance. dtype: the export dtype (default: the checkpoint's); the merged model is checked in it.
    tolerance: largest allowed absolute logit difference of the merge; default a dtype-dependent share of the
    largest logit.
    """
    if qlora_merge not in MERGE_MODES:
        raise ValueError(f"qlora_merge must be one of {MERGE_MODES}, got {qlora_merge!r}")
    dtype = dtype or model.config.model_dtype
    model.eval()
    probe = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in probe.items()}
    # weights a run kept in int8 rows or host memory (frozen, never trained) are the checkpoint's again first: the
    # export is the trained adapters on the original base, as a run without those levers would export
    restore_frozen_storage(model)
    trained = model(**probe).logits.float()  # before anything is rebuilt, re-wrapped or merged
    float8 = restore_linears(model) > 0  # FP8 compute (precision.fp8): same weights, 16-bit matmuls from here on
    quantized = quantized_components(model)
    upcast = not quantized and torch.finfo(dtype).eps < torch.finfo(model.dtype).eps
    if upcast:  # e.g. bf16 training, float32 export: merge in float32 (the upcast is exact), so the check measures the merge
        model.to(dtype)
    reference = model(**probe).logits.float() if upcast or float8 else trained
    label = "adapted model" + (" without float8 compute" if float8 else "")
    label += f" (cast to {str(dtype).removeprefix('torch.')})" if upcast else ""
    gap = sixteen_bit_gap(model, probe, reference, quantized, qlora_merge)
    if gap is not None:
        label += f" on the quantized {', '.join(quantized)} base, as trained (merged into the {qlora_merge} 16-bit base)"
    merge_adapters(model)
    model.to(dtype)
    merged = model(**probe).logits.float()
    diff = float((merged - reference).abs().max())
    if tolerance is None:
        tolerance = DEFAULT_RELATIVE_TOLERANCE.get(dtype, 1e-2) * max(float(reference.abs().max()), 1.0)
    allowed = tolerance + (gap or 0.0)
    if not diff <= allowed:
        allowance = f" + {gap:.4g}, its gap to the {qlora_merge} 16-bit base" if gap is not None else ""
        raise ExportError(
            f"merged logits differ from the {label} by {diff:.4g} (tolerance {tolerance:.4g}{allowance}); nothing was written"
        )
    if float8 and gap is None:
        gap = float((merged - trained).abs().max())
    saved = model.save_pretrained(path, dtype=dtype, overwrite=overwrite)
    return ExportReport(Path(saved), diff, allowed, label, gap)
