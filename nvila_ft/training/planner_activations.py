"""Activations a training step keeps for backward, traced on the meta device (`planner.plan`'s activation lines).

One LLM decoder layer, one vision encoder layer, the projector and the loss run under autograd's saved-tensor hooks,
so they are the tensors autograd keeps for backward, shared storages counted once and parameters left out; 16-bit
runs are traced with autocast's casts of matrix-product inputs, which autocast itself does not apply on the meta
device. Attention is counted as the fused kernels keep it (FlashAttention-2, SDPA's flash / memory-efficient paths,
torch's CPU flash kernel): queries, keys, values, output and the log-sum-exp, never the L x L scores.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from nvila_ft.adapters.components import base_module, get_component
from nvila_ft.adapters.frozen_storage import dequantized_slice_bytes
from nvila_ft.adapters.policy import COMPONENTS
from nvila_ft.model.losses import LOSS_CHUNK_ROWS
from nvila_ft.training.planner_types import DTYPE_BYTES, Line, RunShape, SampleDemand


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


def component_layers(model: Any, name: str) -> list[nn.Module]:
    if name == "llm":
        base = base_module(get_component(model, "llm"))
        return list(base.model.layers)
    return model.vision_tower.used_layers()


def _trains_before(model: Any, name: str) -> bool:
    """Whether anything that feeds component `name` has trainable parameters (then its input needs a gradient)."""
    order = list(COMPONENTS)  # vision_tower, mm_projector, llm
    return any(p.requires_grad for earlier in order[: order.index(name)] for p in get_component(model, earlier).parameters())


def _layer_activations(model: Any, name: str, tokens: int, rows: int, autocast: torch.dtype | None = None) -> int:
    """Bytes autograd keeps for one layer of the component at `rows` x `tokens` positions (under autocast to
    `autocast` when given)."""
    layers = component_layers(model, name)
    layer = layers[0]
    dtype = next(layer.parameters()).dtype
    width = int(model.config.llm_hidden_size if name == "llm" else model.config.vision_hidden_size)
    needs_grad = _trains_before(model, name) or any(p.requires_grad for p in layer.parameters())
    hidden = torch.empty(rows, tokens, width, device="meta", dtype=dtype, requires_grad=needs_grad)
    params = list(layer.parameters())
    with torch.enable_grad(), _SavedTensors([hidden, *params]) as saved, _autocast(autocast):
        if name == "llm":
            base = base_module(get_component(model, "llm"))
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
    base = base_module(get_component(model, "llm"))
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
        ("llm", sample.positions, len(component_layers(model, "llm"))),
    ):
        batch = rows * sample.tiles if name == "vision_tower" else rows
        if batch == 0:
            continue
        per_layer = _layer_activations(model, name, tokens, batch, autocast)
        width = config.llm_hidden_size if name == "llm" else config.vision_hidden_size
        dtype_bytes = DTYPE_BYTES.get(next(component_layers(model, name)[0].parameters()).dtype, 4)
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
        hidden_bytes = DTYPE_BYTES.get(next(component_layers(model, "llm")[0].parameters()).dtype, 4)
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
                                             DTYPE_BYTES.get(next(component_layers(model, "llm")[0].parameters()).dtype, 4), shape.lm_head_bits)
        note += f"; lm_head in {'int8' if shape.lm_head_bits == 8 else 'NF4'} rows"
    lines.append(Line("llm", "loss", saved, note))
    # at the turn to backward: the logits and their float32 copy (forward), or the gradients flowing back
    # through the logits or the largest layer (backward), whichever is larger
    logits_grad = logits_rows * config.vocab_size * 4
    working = max(transient, working // 2, logits_grad)
    lines.append(Line("run", "backward working set", working, "float32 logits, or one layer's activation gradients"))
    return lines
