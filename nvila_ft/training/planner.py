"""What a fine-tuning run needs on each GPU, worked out before anything heavy loads (`nvila-ft plan`).

Nothing here allocates the model. It is built on PyTorch's meta device (shapes only) from the checkpoint's
config files, and the adapter policy is applied to it, so parameter, gradient and optimizer-state counts are
exact. Activations are traced on the meta device at the planned sample: one LLM decoder layer, one vision
encoder layer, the projector and the loss run under autograd's saved-tensor hooks, so they are the tensors
autograd keeps for backward, shared storages counted once and parameters left out; 16-bit runs are traced with
autocast's casts of matrix-product inputs, which autocast itself does not apply on the meta device. Attention is counted as the
fused kernels keep it (FlashAttention-2, SDPA's flash / memory-efficient paths, torch's CPU flash kernel):
queries, keys, values, output and the log-sum-exp, never the L x L scores.

On top come stated allowances: the transient float32 logits of the loss, one layer's working set during
backward, the CUDA context and the allocator's slack. ZeRO divides what it shards by the number of processes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nvila_ft.adapters.apply import apply_policy, get_component
from nvila_ft.adapters.frozen_storage import FrozenStorage, store_frozen_weights
from nvila_ft.adapters.methods import method_of
from nvila_ft.adapters.policy import COMPONENTS, AdapterPolicy
from nvila_ft.model.config import NVILAConfig
from nvila_ft.model.presets import build_from_config
from nvila_ft.model.settings import with_settings
from nvila_ft.model.vision_tower import drop_unused
from nvila_ft.training.planner_activations import activation_lines, component_layers
from nvila_ft.training.planner_types import (  # noqa: F401 - the planner's inputs and outputs, importable from here
    ACTIVATION_PHASE, DTYPE_BYTES, GIB, GRADIENT_PHASE, Line, Plan, RunShape, SampleDemand, SequenceStats,
)

CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context, cuBLAS / cuDNN workspaces and kernels (typical on H100/A100)
ALLOCATOR_SLACK = 0.05  # fragmentation of PyTorch's caching allocator, as a share of everything else
BNB_8BIT_OPTIMIZERS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
FLOAT32_ADAM_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps the states of smaller tensors in float32
BNB_BLOCK = 256  # one float32 absmax per block of 8-bit state


# ---------------------------------------------------------------------------------------------- the model
def meta_model(config: NVILAConfig, policy: AdapterPolicy, dtype: torch.dtype, lora_float32: bool = True,
               storage: FrozenStorage = FrozenStorage()) -> Any:
    """The model on the meta device with the policy applied (quantized methods counted as their LoRA), in the
    compute dtype as autocast computes; LoRA adapters in float32 when the run keeps trainable tensors so (PEFT
    then runs their inputs in float32 too); frozen weights kept as `storage` says."""
    model = build_from_config(config, dtype=dtype, device="meta").train()  # training mode: dropout keeps masks
    drop_unused(model.vision_tower.model, model.vision_tower.num_layers_used)  # never loaded (see the loader)
    counting = copy.deepcopy(policy)
    for name, component in counting.items():
        setattr(counting, name, method_of(component).counted_as(component))
    model = apply_policy(model, counting).to(dtype)
    if lora_float32 and dtype != torch.float32:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    return store_frozen_weights(model, storage)


def weight_lines(model: Any, policy: AdapterPolicy, shape: RunShape) -> list[Line]:
    """Every component's weights by storage dtype; trainable tensors in float32 when they are kept so."""
    lines = []
    dtype_bytes = DTYPE_BYTES[shape.weights_dtype]
    for name in COMPONENTS:
        component = get_component(model, name)
        method = method_of(getattr(policy, name))
        quantized = method.stored_linears(component, name)
        quantized_ids = {id(m.weight) for m in quantized}
        plain, trainable_bytes = 0, 0
        for param in component.parameters():
            if id(param) in quantized_ids:
                continue
            if param.requires_grad:
                trainable_bytes += param.numel() * (4 if shape.lora_float32 else dtype_bytes)
            else:  # the weights dtype, or int8 rows and their float32 scales (precision.*_bits=8)
                plain += param.numel() * param.element_size()
        total = plain + trainable_bytes + sum(method.stored_bytes(m, getattr(policy, name)) for m in quantized)
        note = f"{len(quantized)} linears {method.storage_word(getattr(policy, name))}" if quantized else _dtype_word(shape.weights_dtype)
        note += _frozen_storage_word(name, shape)
        if shape.zero_stage == 3 and shape.offload_params:
            total, note = 0, note + ", offloaded to the CPU (ZeRO-3)"
        elif shape.zero_stage == 3:
            total, note = math.ceil(total / shape.world_size), note + f", ZeRO-3 shard of {shape.world_size}"
        lines.append(Line(name, "weights", total, note))
    if shape.zero_stage == 3 and (shape.world_size > 1 or shape.offload_params):  # layers gathered, with prefetch: about two
        largest = max(sum(p.numel() for p in layer.parameters()) for layer in component_layers(model, "llm"))
        lines.append(Line("llm", "weights", 2 * largest * dtype_bytes, "ZeRO-3: two decoder layers gathered"))
    return lines


def _frozen_storage_word(name: str, shape: RunShape) -> str:
    words = {"llm": [("input embeddings in host memory", shape.offload_embeddings), ("lm_head in int8 rows", shape.lm_head_bits == 8),
                     ("lm_head in NF4 rows", shape.lm_head_bits == 4)],
             "vision_tower": [("linears in int8 rows", shape.vision_tower_bits == 8)]}.get(name, [])
    chosen = [word for word, on in words if on]
    return f"; {', '.join(chosen)}" if chosen else ""


def _dtype_word(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def trainable_counts(model: Any) -> dict[str, int]:
    return {name: sum(p.numel() for p in get_component(model, name).parameters() if p.requires_grad) for name in COMPONENTS}


def optimizer_state_bytes(numels: Sequence[int], optim: str) -> int:
    """Bytes of the optimizer's per-tensor state for trainable tensors of these sizes (`trainer.optim` names).

    torch AdamW: two float32 moments and a float32 step per tensor. bitsandbytes 8-bit AdamW: two uint8 moments
    plus one float32 absmax per 256 values each, except tensors under 4,096 values, which stay float32 (the
    quantile maps are shared by all tensors and left out). SGD without momentum keeps nothing.
    """
    if optim in BNB_8BIT_OPTIMIZERS:
        return sum(2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 8 * n for n in numels)
    if optim in FLOAT32_ADAM_OPTIMIZERS:
        per_tensor = 0 if optim == "paged_adamw_32bit" else 4  # bitsandbytes counts steps in Python
        return sum(8 * n + per_tensor for n in numels)
    if optim == "adafactor":  # an upper bound: a float32 value a parameter and the float32 RMS of each tensor
        return sum(4 * n + 4 for n in numels)  # (its factored moments of matrices take less)
    if optim == "sgd":
        return 0
    raise ValueError(f"no optimizer-state model for trainer.optim = {optim!r}")


def training_state_lines(model: Any, shape: RunShape) -> list[Line]:
    """Gradients and optimizer states of the trainable tensors, divided as ZeRO divides them."""
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    trainable = sum(numels)
    lines = []
    deepspeed = shape.zero_stage > 0
    if deepspeed:
        # DeepSpeed: gradients in the model dtype, float32 master weights and gradient partitions
        grad_bytes = trainable * DTYPE_BYTES[shape.weights_dtype]
        if shape.zero_stage >= 2:
            grad_bytes = math.ceil(grad_bytes / shape.world_size)
        if not shape.offload_optimizer:  # the float32 gradient partition lives with the optimizer
            grad_bytes += math.ceil(trainable * 4 / shape.world_size)
        lines.append(Line("run", "gradients", grad_bytes, f"{trainable:,} trainable; ZeRO-{shape.zero_stage} over {shape.world_size}"))
    else:
        gradient_bytes = trainable * (4 if shape.lora_float32 or shape.weights_dtype == torch.float32 else DTYPE_BYTES[shape.weights_dtype])
        note = f"{trainable:,} trainable"
        if shape.world_size > 1:  # DDP reduces through its own buckets, a second gradient-sized buffer
            gradient_bytes, note = 2 * gradient_bytes, note + ", DDP buckets"
        lines.append(Line("run", "gradients", gradient_bytes, note))
    step_bytes = 0 if shape.offload_optimizer else lines[0].bytes
    step_note = "on the CPU" if shape.offload_optimizer else "temporaries of the update, about the gradients' size"
    if not shape.cuda and shape.optim in BNB_8BIT_OPTIMIZERS and numels:
        # bitsandbytes' CPU update (no fused kernel) holds float32 copies of each tensor's two states, gradient,
        # weight and denominator and a square root at once: 20 bytes a value, 24 for a 16-bit tensor (its float32 copy)
        per_value = 20 if shape.lora_float32 or shape.weights_dtype == torch.float32 else 24
        step_bytes = max(step_bytes, per_value * max(numels))
        step_note = f"bitsandbytes' CPU update: float32 working copies of the largest tensor ({max(numels):,} values)"
    lines.append(Line("run", "optimizer step", step_bytes, step_note))
    states = optimizer_state_bytes(numels, shape.optim)
    note = f"{shape.optim}: {states / max(trainable, 1):.1f} bytes a trainable parameter"
    if deepspeed:
        states = math.ceil((states + 4 * trainable) / shape.world_size)  # plus the float32 master weights
        note += f" + float32 master weights, ZeRO over {shape.world_size}"
    if shape.offload_optimizer:
        states, note = 0, note + ", offloaded to the CPU"
    elif shape.optim.startswith("paged"):
        note += " (paged: may move to the CPU under pressure)"
    lines.append(Line("run", "optimizer", states, note))
    return lines


# ---------------------------------------------------------------------------------------------- the plan
def plan(config: NVILAConfig, policy: AdapterPolicy, sample: SampleDemand, shape: RunShape, model: Any = None) -> Plan:
    """The memory of one GPU for one micro-batch of `sample`-sized rows."""
    model = model if model is not None else meta_model(config, policy, shape.weights_dtype, shape.lora_float32, shape.storage)
    lines = weight_lines(model, policy, shape) + training_state_lines(model, shape) + activation_lines(model, sample, shape)
    result = Plan(lines, sample, shape)
    if shape.cuda:
        slack = int(ALLOCATOR_SLACK * result.total)
        lines.append(Line("run", "CUDA context", CUDA_CONTEXT_BYTES, "context, library workspaces, kernels"))
        lines.append(Line("run", "allocator slack", slack, f"{ALLOCATOR_SLACK:.0%} of the peak"))
    return result


@dataclass
class Change:
    """A change to the run that lowers memory, and what it costs besides."""

    overrides: list[str]
    description: str
    cost: str
    apply: Any = field(repr=False)  # (policy, shape, config) -> (policy, shape, config)


def changes(policy: AdapterPolicy, shape: RunShape, config: NVILAConfig) -> list[Change]:
    """Candidate changes, cheapest first (what they cost in speed or accuracy)."""
    out = []
    if not shape.optim.endswith("8bit"):
        out.append(Change(["trainer.optim=adamw_bnb_8bit"], "8-bit AdamW (bitsandbytes)", "none measurable",
                          lambda p, s, c: (p, replace(s, optim="adamw_bnb_8bit"), c)))
    if not shape.selective_loss:
        out.append(Change(["trainer.selective_loss=true"], "logits only where the loss is taken", "none",
                          lambda p, s, c: (p, replace(s, selective_loss=True), c)))
    if "llm" not in shape.checkpointing:
        out.append(Change(["trainer.gradient_checkpointing=[llm]"], "checkpoint the LLM's layers", "about 30% slower",
                          lambda p, s, c: (p, replace(s, checkpointing=(*s.checkpointing, "llm")), c)))
    if "vision_tower" not in shape.checkpointing and policy.vision_tower.trains:
        out.append(Change(["trainer.gradient_checkpointing=[vision_tower,llm]"], "checkpoint the vision tower's layers too",
                          "slower vision steps", lambda p, s, c: (p, replace(s, checkpointing=(*s.checkpointing, "vision_tower")), c)))
    if shape.micro_batch > 1:
        accumulation = shape.gradient_accumulation * shape.micro_batch
        out.append(Change(["trainer.per_device_train_batch_size=1", f"trainer.gradient_accumulation_steps={accumulation}"],
                          "micro-batch 1 (same global batch)", "slower steps",
                          lambda p, s, c, a=accumulation: (p, replace(s, micro_batch=1, gradient_accumulation=a), c)))
    if not shape.offload_activations:
        out.append(Change(["trainer.offload_activations=true"], "activations kept in CPU memory", "host transfers each step",
                          lambda p, s, c: (p, replace(s, offload_activations=True), c)))
    tied = bool(config.llm.get("tie_word_embeddings", False))
    for override, description, cost, lever in (
        ("trainer.offload_embeddings=true", "the frozen input embedding table in CPU memory", "a host-to-GPU copy of the batch's rows",
         {"offload_embeddings": True}),
        ("precision.lm_head_bits=8", "the frozen lm_head in int8 rows", "int8 rounding of the logits' weights; dequantized per slice",
         {"lm_head_bits": 8}),
        ("precision.vision_tower_bits=8", "the frozen vision tower's linears in int8 rows", "int8 rounding of the vision weights",
         {"vision_tower_bits": 8}),
    ):
        changed = replace(shape, **lever)
        if changed != shape and not changed.storage.problems(policy, tied) and shape.zero_stage == 0:
            out.append(Change([override], description, cost, lambda p, s, c, lever=lever: (p, replace(s, **lever), c)))
    if shape.lora_float32:
        out.append(Change(["precision.trainable_float32=false"], "trained tensors (LoRA, norms) in 16 bits",
                          "16-bit updates of the trained tensors", lambda p, s, c: (p, replace(s, trainable_float32=False), c)))
    quantized = method_of(policy.llm).quantized_variant(policy.llm)
    if quantized is not None:
        out.append(Change(["adapters.llm.method=qlora"], "4-bit QLoRA base for the LLM", "a little accuracy, slower steps",
                          lambda p, s, c, q=quantized: (replace(p, llm=q), s, c)))
    if shape.world_size > 1 and shape.zero_stage < 3:
        out.append(Change(["deepspeed=zero3"], f"ZeRO-3 over the {shape.world_size} processes", "communication",
                          lambda p, s, c: (p, replace(s, zero_stage=3), c)))
    if not shape.offload_optimizer and (shape.zero_stage > 0 or shape.world_size == 1):
        # ZeRO-Offload steps DeepSpeed's CPU Adam, which replaces any other optimizer
        out.append(Change(["deepspeed=zero2_offload" if shape.zero_stage < 3 else "deepspeed=zero3_offload", "trainer.optim=adamw_torch"],
                          "optimizer states on the CPU (ZeRO-Offload)", "CPU-bound optimizer steps",
                          lambda p, s, c: (p, replace(s, offload_optimizer=True, optim="adamw_torch", zero_stage=max(s.zero_stage, 2),
                                                      offload_params=s.zero_stage == 3), c)))
    if config.image_aspect_ratio in ("dynamic", "dynamic_s2") and config.max_tiles > max(config.min_tiles, 1):
        fewer = max(config.min_tiles, config.s2_min_tiles, config.max_tiles // 2)
        if fewer < config.max_tiles:
            out.append(Change([f"model.max_tiles={fewer}"], f"at most {fewer} tiles an image", "detail in large images",
                              lambda p, s, c, n=fewer: (p, s, with_settings(c, max_tiles=n))))
    return out


def gib(value: int) -> str:
    return f"{value / GIB:,.2f} GiB"

