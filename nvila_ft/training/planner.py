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

import contextlib
import copy
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from nvila_ft.adapters.apply import apply_policy, get_component
from nvila_ft.adapters.frozen_storage import FrozenStorage, dequantized_slice_bytes, store_frozen_weights
from nvila_ft.adapters.policy import COMPONENTS, AdapterPolicy
from nvila_ft.model.config import NVILAConfig
from nvila_ft.model.losses import LOSS_CHUNK_ROWS
from nvila_ft.model.presets import build_from_config
from nvila_ft.model.settings import with_settings
from nvila_ft.model.vision_tower import drop_unused

GIB = 2**30
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context, cuBLAS / cuDNN workspaces and kernels (typical on H100/A100)
ALLOCATOR_SLACK = 0.05  # fragmentation of PyTorch's caching allocator, as a share of everything else
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
BNB_8BIT_OPTIMIZERS = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")
FLOAT32_ADAM_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps the states of smaller tensors in float32
BNB_BLOCK = 256  # one float32 absmax per block of 8-bit state


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class SampleDemand:
    """What one micro-batch row asks: LLM positions, vision tiles (and frames), supervised positions."""

    positions: int
    tiles: int
    supervised: int


@dataclass
class SequenceStats:
    """The samples the plan looked at, and the ones it plans for."""

    samples: list[SampleDemand]
    total: int  # records in the task (the samples may be a sample of them)

    def quantile(self, q: float) -> SampleDemand:
        ordered = sorted(self.samples, key=lambda s: (s.positions, s.tiles))
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    @property
    def p50(self) -> SampleDemand:
        return self.quantile(0.5)

    @property
    def p95(self) -> SampleDemand:
        return self.quantile(0.95)

    @property
    def max(self) -> SampleDemand:
        """The largest positions, tiles and supervised positions of the samples (not always one sample: a video
        may have the most tiles and a long text the most positions)."""
        return SampleDemand(*(max(getattr(s, f) for s in self.samples) for f in ("positions", "tiles", "supervised")))


@dataclass(frozen=True)
class RunShape:
    """Everything beyond the model and the policy that decides memory."""

    weights_dtype: torch.dtype = torch.bfloat16
    trainable_float32: bool = True
    micro_batch: int = 1
    checkpointing: tuple[str, ...] = ()  # components with gradient checkpointing: "vision_tower", "llm"
    optim: str = "adamw_torch"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    world_size: int = 1
    selective_loss: bool = False  # only supervised positions go through lm_head
    gradient_accumulation: int = 1  # micro-batches a step: their gradients live through the later forwards
    offload_activations: bool = False  # tensors saved for backward kept in CPU memory
    cuda: bool = True  # count the CUDA context
    offload_embeddings: bool = False  # the frozen input embedding table in host memory
    lm_head_bits: int = 16  # 8: a frozen lm_head stored as int8 rows
    vision_tower_bits: int = 16  # 8: a frozen / LayerNorm-tuned vision tower's linears as int8 rows

    @property
    def storage(self) -> FrozenStorage:
        return FrozenStorage(self.offload_embeddings, self.lm_head_bits, self.vision_tower_bits)

    @property
    def lora_float32(self) -> bool:
        """Whether trainable tensors are held in float32 beside 16-bit weights (nvila-ft does without DeepSpeed,
        which keeps its own float32 master copies instead)."""
        return self.trainable_float32 and self.zero_stage == 0 and self.weights_dtype != torch.float32


# ---------------------------------------------------------------------------------------------- output
@dataclass(frozen=True)
class Line:
    component: str  # vision_tower, mm_projector, llm, or "run" for what belongs to no component
    item: str  # weights, gradients, optimizer, activations, ...
    bytes: int
    note: str = ""


# Memory that lives through the whole step, and what peaks at different moments of it: activations (with the
# loss and the backward working set) at the turn from forward to backward, gradients at the optimizer step.
STEADY = ("weights", "optimizer", "CUDA context", "allocator slack")
ACTIVATION_PHASE = ("activations", "loss", "backward working set")
GRADIENT_PHASE = ("gradients", "optimizer step")


@dataclass
class Plan:
    lines: list[Line]
    sample: SampleDemand
    shape: RunShape

    @property
    def total(self) -> int:
        """The peak: steady memory plus the larger of the activation peak and the gradient peak. With gradient
        accumulation the gradients of the earlier micro-batches are held through every later forward too."""
        items = self.by_item()
        activation = sum(items.get(item, 0) for item in ACTIVATION_PHASE)
        if self.shape.gradient_accumulation > 1:
            activation += items.get("gradients", 0)
        gradient = sum(items.get(item, 0) for item in GRADIENT_PHASE)
        return sum(items.get(item, 0) for item in STEADY) + max(activation, gradient)

    @property
    def allocated(self) -> int:
        """The peak of tensor bytes alone (what `torch.cuda.max_memory_allocated` reports): the total without the
        CUDA context and the allocator's slack."""
        items = self.by_item()
        return self.total - items.get("CUDA context", 0) - items.get("allocator slack", 0)

    def by_item(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.lines:
            out[line.item] = out.get(line.item, 0) + line.bytes
        return out


# ---------------------------------------------------------------------------------------------- the model
def meta_model(config: NVILAConfig, policy: AdapterPolicy, dtype: torch.dtype, lora_float32: bool = True,
               storage: FrozenStorage = FrozenStorage()) -> Any:
    """The model on the meta device with the policy applied (quantized methods counted as their LoRA), in the
    compute dtype as autocast computes; LoRA adapters in float32 when the run keeps trainable tensors so (PEFT
    then runs their inputs in float32 too); frozen weights kept as `storage` says."""
    model = build_from_config(config, dtype=dtype, device="meta").train()  # training mode: dropout keeps masks
    drop_unused(model.vision_tower.model, model.vision_tower.num_layers_used)  # never loaded (see the loader)
    counting = copy.deepcopy(policy)
    for name in COMPONENTS:
        component = getattr(counting, name)
        if component.method in ("qlora", "fp8_lora"):
            setattr(counting, name, replace(component, method="dora" if component.dora else "lora", dora=False))
    model = apply_policy(model, counting).to(dtype)
    if lora_float32 and dtype != torch.float32:
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    return store_frozen_weights(model, storage)


def _quantized_linears(model: Any, name: str, policy: AdapterPolicy) -> list[nn.Linear]:
    """The base linears a quantized method stores in 4 / 8 bits or float8 (what bitsandbytes / torchao convert)."""
    component = getattr(policy, name)
    if component.method == "qlora":
        skip = {"llm": "lm_head", "vision_tower": "head"}.get(name, "")
        linears = {id(m): m for n, m in get_component(model, name).named_modules()
                   if isinstance(m, nn.Linear) and skip not in n.split(".") and "lora_" not in n}
        return list(linears.values())
    if component.method == "fp8_lora":
        # the LoRA targets: every linear that carries an adapter
        return [m.base_layer for m in get_component(model, name).modules() if isinstance(getattr(m, "base_layer", None), nn.Linear)]
    return []


def _quantized_bytes(linear: nn.Linear, policy: Any) -> int:
    """Storage of one quantized linear weight: codes plus quantization constants (bitsandbytes / torchao layouts)."""
    numel, rows = linear.weight.numel(), linear.weight.shape[0]
    if policy.method == "fp8_lora":
        return numel + 4 * rows  # float8 codes, one float32 scale per row
    if policy.quantization.bits == 8:
        return numel + 4 * rows  # int8 codes, one float32 absmax per row
    # 4-bit: two codes a byte, one absmax per block of 64 and the 16-value float32 code book; double quantization
    # stores the absmax in 8 bits with a float32 absmax per 256 of them, a 256-value code book and an offset
    blocks = math.ceil(numel / 64)
    if policy.quantization.double_quant:
        return math.ceil(numel / 2) + 4 * 16 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4
    return math.ceil(numel / 2) + 4 * 16 + 4 * blocks


def weight_lines(model: Any, policy: AdapterPolicy, shape: RunShape) -> list[Line]:
    """Every component's weights by storage dtype; trainable tensors in float32 when they are kept so."""
    lines = []
    dtype_bytes = DTYPE_BYTES[shape.weights_dtype]
    for name in COMPONENTS:
        component = get_component(model, name)
        quantized = _quantized_linears(model, name, policy)
        quantized_ids = {id(m.weight) for m in quantized}
        plain, trainable_bytes = 0, 0
        for param in component.parameters():
            if id(param) in quantized_ids:
                continue
            if param.requires_grad:
                trainable_bytes += param.numel() * (4 if shape.lora_float32 else dtype_bytes)
            else:  # the weights dtype, or int8 rows and their float32 scales (precision.*_bits=8)
                plain += param.numel() * param.element_size()
        total = plain + trainable_bytes + sum(_quantized_bytes(m, getattr(policy, name)) for m in quantized)
        note = f"{len(quantized)} linears {_storage_word(getattr(policy, name))}" if quantized else _dtype_word(shape.weights_dtype)
        note += _frozen_storage_word(name, shape)
        if shape.zero_stage == 3 and shape.offload_params:
            total, note = 0, note + ", offloaded to the CPU (ZeRO-3)"
        elif shape.zero_stage == 3:
            total, note = math.ceil(total / shape.world_size), note + f", ZeRO-3 shard of {shape.world_size}"
        lines.append(Line(name, "weights", total, note))
    if shape.zero_stage == 3 and (shape.world_size > 1 or shape.offload_params):  # layers gathered, with prefetch: about two
        largest = max(sum(p.numel() for p in layer.parameters()) for layer in _layers(model, "llm"))
        lines.append(Line("llm", "weights", 2 * largest * dtype_bytes, "ZeRO-3: two decoder layers gathered"))
    return lines


def _storage_word(component: Any) -> str:
    if component.method == "fp8_lora":
        return "in float8"
    return f"in {component.quantization.bits}-bit" + (" (double-quantized constants)" if component.quantization.double_quant and component.quantization.bits == 4 else "")


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


# ---------------------------------------------------------------------------------------------- activations
class _SavedTensors:
    """Bytes of the tensors autograd saves for backward inside the context and still holds when `bytes` is read
    (storages counted once, parameters and the given inputs left out). Read it while the traced output is alive:
    what a discarded side graph saved (PEFT's DoRA builds one to take the weight norm) is freed in a real step."""

    def __init__(self, exclude: Sequence[torch.Tensor]) -> None:
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.saved: list[tuple[weakref.ref, int, int]] = []

    def __enter__(self) -> "_SavedTensors":
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in self.exclude:
                self.saved.append((weakref.ref(tensor), storage._cdata, storage.nbytes()))
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        alive: dict[int, int] = {}
        for tensor, storage, nbytes in self.saved:
            if tensor() is not None:
                alive[storage] = max(alive.get(storage, 0), nbytes)
        return sum(alive.values())


class _Autocast(TorchFunctionMode):
    """torch.autocast's lower-precision casts on the meta device, where autocast itself does nothing: the inputs of
    matrix products run in `dtype`, so the copies they save are `dtype` copies (a float32 LoRA input or PEFT DoRA's
    float32 weight copy is saved in 16 bits, as in a real bf16 step)."""

    OPS = {F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, F.conv2d, torch.Tensor.matmul,
           torch.Tensor.__matmul__}

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            def cast(value: Any) -> Any:
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != self.dtype:
                    return value.to(self.dtype)
                return value

            args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _autocast(dtype: torch.dtype | None) -> Any:
    """The trace's stand-in for the run's autocast (none in float32 runs)."""
    return _Autocast(dtype) if dtype is not None else contextlib.nullcontext()


class _FusedAttention(torch.autograd.Function):
    """Stands for a fused attention kernel on the meta device: keeps q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, lse)
        return output

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run on the meta device
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


def _fused_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function over [batch, heads, length, head_dim] (grouped keys repeated)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    output = _FusedAttention.apply(query, key, value)
    return output.transpose(1, 2).contiguous(), None


def _with_fused_attention(module: nn.Module) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register("nvila_ft_plan", _fused_attention)
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "nvila_ft_plan"


def _layers(model: Any, name: str) -> list[nn.Module]:
    if name == "llm":
        base = get_component(model, "llm")
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        return list(base.model.layers)
    return model.vision_tower.used_layers()


def _trains_before(model: Any, name: str) -> bool:
    """Whether anything that feeds component `name` has trainable parameters (then its input needs a gradient)."""
    order = list(COMPONENTS)  # vision_tower, mm_projector, llm
    return any(p.requires_grad for earlier in order[: order.index(name)] for p in get_component(model, earlier).parameters())


def _layer_activations(model: Any, name: str, tokens: int, rows: int, autocast: torch.dtype | None = None) -> int:
    """Bytes autograd keeps for one layer of the component at `rows` x `tokens` positions (under autocast to
    `autocast` when given)."""
    layers = _layers(model, name)
    layer = layers[0]
    dtype = next(layer.parameters()).dtype
    width = int(model.config.llm_hidden_size if name == "llm" else model.config.vision_hidden_size)
    needs_grad = _trains_before(model, name) or any(p.requires_grad for p in layer.parameters())
    hidden = torch.empty(rows, tokens, width, device="meta", dtype=dtype, requires_grad=needs_grad)
    params = list(layer.parameters())
    with torch.enable_grad(), _SavedTensors([hidden, *params]) as saved, _autocast(autocast):
        if name == "llm":
            base = get_component(model, "llm")
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            positions = torch.arange(tokens, device="meta")[None].expand(rows, -1)
            embeddings = base.model.rotary_emb(hidden, positions)
            _output = layer(hidden, attention_mask=None, position_embeddings=embeddings, position_ids=positions)
        else:
            _output = layer(hidden, None)
    return saved.bytes  # while `_output` holds the graph


def _projector_activations(model: Any, tiles: int, autocast: torch.dtype | None = None) -> int:
    config = model.config
    dtype = next(model.mm_projector.parameters()).dtype
    features = torch.empty(tiles, config.patches_per_side**2, config.mm_hidden_size, device="meta", dtype=dtype,
                           requires_grad=_trains_before(model, "mm_projector"))
    with torch.enable_grad(), _SavedTensors([features, *model.mm_projector.parameters()]) as saved, _autocast(autocast):
        _output = model.mm_projector(features)
    return saved.bytes  # while `_output` holds the graph


def _logits_bytes(dtype_bytes: int) -> int:
    """Bytes a logit takes in the loss: the logits and their float32 copy (`.float()` copies nothing in float32)."""
    return dtype_bytes + 4 if dtype_bytes != 4 else 4


def _loss_activations(model: Any, positions: int, rows: int, logits_positions: int) -> tuple[int, int]:
    """(saved bytes of the final norm, lm_head and loss; transient bytes of the float32 logits) for the full loss
    over `logits_positions` positions."""
    base = get_component(model, "llm")
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    dtype = base.model.norm.weight.dtype  # (lm_head's weight may be int8 rows)
    hidden = torch.empty(rows, positions, model.config.llm_hidden_size, device="meta", dtype=dtype, requires_grad=True)
    with torch.enable_grad(), _SavedTensors([hidden, *base.parameters()]) as saved:
        normed = base.model.norm(hidden)[:, :logits_positions]
        logits = base.lm_head(normed).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.zeros(logits.shape[:2], dtype=torch.long, device="meta").flatten())
    saved_bytes = saved.bytes  # while `loss` holds the graph
    vocab = model.config.vocab_size
    transient = rows * logits_positions * vocab * _logits_bytes(DTYPE_BYTES.get(dtype, 4))
    del loss
    return saved_bytes, transient


def activation_lines(model: Any, sample: SampleDemand, shape: RunShape) -> list[Line]:
    """Activations kept for backward per component at this sample (times the micro-batch), and the transients."""
    _with_fused_attention(model)
    config = model.config
    rows = shape.micro_batch
    autocast = shape.weights_dtype if shape.weights_dtype != torch.float32 else None  # 16-bit runs train under autocast
    lines = []
    working = recomputed = 0
    for name, tokens, count in (
        ("vision_tower", config.patches_per_side**2, model.vision_tower.num_layers_used),
        ("llm", sample.positions, len(_layers(model, "llm"))),
    ):
        batch = rows * sample.tiles if name == "vision_tower" else rows
        if batch == 0:
            continue
        per_layer = _layer_activations(model, name, tokens, batch, autocast)
        width = config.llm_hidden_size if name == "llm" else config.vision_hidden_size
        dtype_bytes = DTYPE_BYTES.get(next(_layers(model, name)[0].parameters()).dtype, 4)
        if name in shape.checkpointing and per_layer:
            kept = count * batch * tokens * width * dtype_bytes  # the layers' inputs; one layer is recomputed at a time
            note = f"checkpointed: {count} layer inputs"
            recomputed = max(recomputed, per_layer)
        else:
            kept, note = count * per_layer, f"{count} layers x {per_layer / 2**20:,.1f} MiB"
        if shape.offload_activations:
            kept, note = 0, note + ", offloaded to the CPU"
        lines.append(Line(name, "activations", kept, note))
        working = max(working, per_layer)
    if recomputed:
        lines.append(Line("run", "activations", recomputed, "the one checkpointed layer recomputed during backward"))
    if sample.tiles:
        lines.append(Line("mm_projector", "activations", _projector_activations(model, rows * sample.tiles, autocast), ""))
    supervised = min(sample.supervised, sample.positions)
    if shape.selective_loss:
        # the gathered hidden rows are kept; each chunk's logits are recomputed in backward, one chunk at a time
        norm_saved, _ = _loss_activations(model, sample.positions, rows, 0)
        hidden_bytes = DTYPE_BYTES.get(next(_layers(model, "llm")[0].parameters()).dtype, 4)
        saved = norm_saved + rows * supervised * config.llm_hidden_size * hidden_bytes
        logits_rows = min(rows * supervised, LOSS_CHUNK_ROWS)
        transient = logits_rows * config.vocab_size * _logits_bytes(hidden_bytes)
        note = f"hidden rows of {supervised:,} supervised positions; logits {logits_rows:,} rows at a time"
    else:
        saved, transient = _loss_activations(model, sample.positions, rows, sample.positions)
        logits_rows = rows * sample.positions
        note = f"log-probabilities of {sample.positions:,} positions x {config.vocab_size:,} tokens"
    if shape.lm_head_bits != 16:  # lm_head dequantizes one slice of its rows at a time, beside the logits
        transient += dequantized_slice_bytes(config.vocab_size, config.llm_hidden_size,
                                             DTYPE_BYTES.get(next(_layers(model, "llm")[0].parameters()).dtype, 4), shape.lm_head_bits)
        note += f"; lm_head in {'int8' if shape.lm_head_bits == 8 else 'NF4'} rows"
    lines.append(Line("llm", "loss", saved, note))
    # at the turn to backward: the logits and their float32 copy (forward), or the gradients flowing back
    # through the logits or the largest layer (backward), whichever is larger
    logits_grad = logits_rows * config.vocab_size * 4
    working = max(transient, working // 2, logits_grad)
    lines.append(Line("run", "backward working set", working, "float32 logits, or one layer's activation gradients"))
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
    if policy.llm.method in ("lora", "dora"):
        quantized = replace(policy.llm, method="qlora", dora=policy.llm.method == "dora")
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
