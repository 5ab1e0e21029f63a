"""Where frozen weights are kept, to free accelerator memory without changing what is trained.

- `HostEmbedding` (`trainer.offload_embeddings`): the LLM's input embedding table stays in host memory and only the
  rows of a batch are gathered there and sent to the accelerator. Under every LoRA / QLoRA / frozen LLM policy the
  table is frozen, and it is as large as lm_head (1.09 GB at NVILA-8B, 1.56 GB at NVILA-15B in bf16).
- `Int8RowLinear` (`precision.lm_head_bits=8`, `precision.vision_tower_bits=8`): a frozen linear stored as int8
  codes with one float32 scale per output row (absmax / 127, the layout of bitsandbytes' `Int8Params`: codes and
  `SCB`). A slice of rows at a time, the codes are turned into the compute dtype (exactly) and multiplied, the
  scales applied to the products, in forward and again in backward for the input's gradient, so no 16-bit copy of
  the whole weight ever exists: lm_head's selective loss and a LayerNorm-tuned vision tower keep their gradients.
  bitsandbytes' own 8-bit linear quantizes the activations too (LLM.int8) and dequantizes the whole weight for the
  input gradient, which at lm_head's 151,648 rows is the 16-bit copy this lever removes.
- `Nf4RowLinear` (`precision.lm_head_bits=4`): lm_head in bitsandbytes' NF4 blocks of 64 (its own quantize_4bit /
  dequantize_4bit), dequantized by the same slices of rows.

Nothing here is saved: adapters hold trained tensors only, and `restore_frozen_storage` puts the checkpoint's own
16-bit tensors back before a merge, so exports are those of a run without these levers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nvila_ft.adapters.components import base_module
from nvila_ft.adapters.methods import method_of

# A weight is turned into the compute dtype at most this many values at a time (4 Mi values: 8 MiB in bf16).
INT8_SLICE_VALUES = 1 << 22


# ---------------------------------------------------------------------------------------------- int8 rows
def int8_slice_rows(in_features: int) -> int:
    """Rows of an int8 weight dequantized together (at least one)."""
    return max(1, INT8_SLICE_VALUES // max(in_features, 1))


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 absmax per row) of a 2-D weight, rows = round(127 * w / absmax); a slice of rows at a
    time, so the float32 working copy stays small (bitsandbytes' `int8_vectorwise_quant` takes the whole tensor)."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    absmax = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    step = int8_slice_rows(weight.shape[1])
    for start in range(0, weight.shape[0], step):
        rows = weight[start : start + step].float()
        scale = rows.abs().amax(dim=1)
        absmax[start : start + step] = scale
        codes[start : start + step] = torch.round(rows * (127.0 / scale.clamp(min=torch.finfo(torch.float32).tiny))[:, None]).to(torch.int8)
    return codes, absmax


def autocast_input(inputs: torch.Tensor) -> torch.Tensor:
    """The input as autocast would give it to a linear layer (the planner's meta trace casts itself)."""
    if not inputs.is_meta and torch.is_autocast_enabled(inputs.device.type):
        return inputs.to(torch.get_autocast_dtype(inputs.device.type))
    return inputs


def dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight rows `codes` (int8) with their absmax, in `dtype` (computed in float32)."""
    return codes.float().mul_((absmax.float() / 127.0)[:, None]).to(dtype)


class _Int8RowMatmul(torch.autograd.Function):
    """inputs @ (codes * absmax / 127).T a slice of rows at a time, with the row scales applied to the products
    (x . (c s) = s (x . c)): each slice's int8 codes become the compute dtype exactly (|c| <= 127) and nothing is
    scaled but the outputs; the backward gives the input's gradient only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(codes, absmax)  # the int8 weight itself: nothing the size of a 16-bit copy
        scales = (absmax / 127.0).to(inputs.dtype)
        step = int8_slice_rows(codes.shape[1])
        if step >= codes.shape[0]:  # one slice: the product is the output
            return F.linear(inputs, codes.to(inputs.dtype)).mul_(scales)
        out = inputs.new_empty((*inputs.shape[:-1], codes.shape[0]))
        for start in range(0, codes.shape[0], step):
            rows = slice(start, start + step)
            out[..., rows] = F.linear(inputs, codes[rows].to(inputs.dtype)).mul_(scales[rows])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, absmax = ctx.saved_tensors
        scales = (absmax / 127.0).to(grad.dtype)
        grad_input = None
        step = int8_slice_rows(codes.shape[1])
        for start in range(0, codes.shape[0], step):
            rows = slice(start, start + step)
            part = (grad[..., rows] * scales[rows]) @ codes[rows].to(grad.dtype)
            grad_input = part if grad_input is None else grad_input.add_(part)
        return grad_input, None, None


class Int8RowLinear(nn.Module):
    """A frozen linear layer stored as int8 rows with float32 absmax scales; computes in its input's dtype (the
    autocast dtype under autocast, as `nn.Linear` would)."""

    def __init__(self, codes: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight_absmax = nn.Parameter(absmax, requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8RowLinear":
        if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
            raise ValueError("int8 storage is for frozen linears")
        codes, absmax = quantize_rows(linear.weight.detach())
        return cls(codes, absmax, linear.bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_absmax, dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = autocast_input(inputs)
        out = _Int8RowMatmul.apply(inputs, self.weight, self.weight_absmax)
        return out + self.bias.to(out.dtype) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8 rows"


# bitsandbytes' NF4 blockwise format (`quantize_4bit`): two codes a byte, one float32 absmax per block of 64 values
NF4_BLOCK = 64


class _Nf4RowMatmul(torch.autograd.Function):
    """inputs @ W.T with W stored by `Nf4RowLinear`, a slice of rows dequantized at a time (forward, and again in
    backward for the input's gradient; the weight is frozen)."""

    @staticmethod
    def forward(ctx, inputs: torch.Tensor, layer: "Nf4RowLinear") -> torch.Tensor:
        ctx.layer = layer  # its packed codes are what backward reads again: nothing the size of a 16-bit copy
        out = inputs.new_empty((*inputs.shape[:-1], layer.out_features))
        for rows in layer.slices():
            out[..., rows] = F.linear(inputs, layer.rows(rows, inputs.dtype))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer, grad_input = ctx.layer, None
        for rows in layer.slices():
            part = grad[..., rows] @ layer.rows(rows, grad.dtype)
            grad_input = part if grad_input is None else grad_input.add_(part)
        return grad_input, None


class Nf4RowLinear(nn.Module):
    """A frozen linear layer (no bias) stored in bitsandbytes' NF4 format, blocks of 64 values along its rows; rows
    are dequantized by `bitsandbytes.functional.dequantize_4bit` a slice at a time."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out_features: int, in_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight_absmax = nn.Parameter(absmax, requires_grad=False)
        self.register_buffer("code", code)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Nf4RowLinear":
        out_features, in_features = linear.weight.shape
        if linear.weight.requires_grad or linear.bias is not None:
            raise ValueError("4-bit row storage is for frozen linears without a bias")
        if in_features % NF4_BLOCK:
            raise ValueError(f"4-bit row storage needs in_features divisible by {NF4_BLOCK} (got {in_features})")
        weight = linear.weight.detach()
        packed = torch.empty(out_features * in_features // 2, 1, dtype=torch.uint8, device=weight.device)
        absmax = torch.empty(out_features * in_features // NF4_BLOCK, dtype=torch.float32, device=weight.device)
        code = torch.empty(16, dtype=torch.float32, device=weight.device)
        layer = cls(packed, absmax, code, out_features, in_features)
        if weight.is_meta:  # the planner's shapes-only model
            return layer
        import bitsandbytes.functional as bnb_functional

        for rows in layer.slices():
            codes, state = bnb_functional.quantize_4bit(weight[rows], blocksize=NF4_BLOCK, quant_type="nf4")
            layer.weight.data[layer._bytes(rows)] = codes
            layer.weight_absmax.data[layer._blocks(rows)] = state.absmax
            layer.code.copy_(state.code)
        return layer

    def slices(self) -> Iterator[slice]:
        step = int8_slice_rows(self.in_features)
        return (slice(start, min(start + step, self.out_features)) for start in range(0, self.out_features, step))

    def _bytes(self, rows: slice) -> slice:
        return slice(rows.start * self.in_features // 2, rows.stop * self.in_features // 2)

    def _blocks(self, rows: slice) -> slice:
        return slice(rows.start * self.in_features // NF4_BLOCK, rows.stop * self.in_features // NF4_BLOCK)

    def rows(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """The weight's rows `rows`, dequantized to `dtype`."""
        if self.weight.is_meta:
            return torch.empty(rows.stop - rows.start, self.in_features, dtype=dtype, device="meta")
        import bitsandbytes.functional as bnb_functional

        state = bnb_functional.QuantState(absmax=self.weight_absmax[self._blocks(rows)], shape=torch.Size([rows.stop - rows.start, self.in_features]),
                                          code=self.code, blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype)
        return bnb_functional.dequantize_4bit(self.weight[self._bytes(rows)], state)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([self.rows(rows, dtype) for rows in self.slices()])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return _Nf4RowMatmul.apply(autocast_input(inputs), self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False, nf4 rows"


def dequantized_slice_bytes(out_features: int, in_features: int, dtype_bytes: int, bits: int = 8) -> int:
    """The most bytes a stored linear holds for its weight while it multiplies: one slice in the compute dtype
    (4-bit: and bitsandbytes' float32 dequantization of it)."""
    return min(int8_slice_rows(in_features), out_features) * in_features * (dtype_bytes + (4 if bits == 4 else 0))


# ---------------------------------------------------------------------------------------------- host embedding
class HostEmbedding(nn.Module):
    """A frozen embedding table kept in host memory; a batch's rows are gathered there and sent to its device.

    The table is a plain attribute, neither parameter nor buffer, so `Module.to(device)` (the Trainer's) leaves it
    where it is and nothing counts it among the model's accelerator tensors; it is pinned when CUDA is present.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        if embedding.weight.requires_grad:
            raise ValueError("host memory is for a frozen embedding table")
        table = embedding.weight.detach()
        if not table.is_meta:  # (the planner's shapes-only model keeps it on the meta device)
            table = table.to("cpu")
            table = table.pin_memory() if torch.cuda.is_available() else table
        self.table = table
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = table.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids.to("cpu"), self.table, self.padding_idx)
        return rows.to(input_ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, in host memory"


# ---------------------------------------------------------------------------------------------- the levers
@dataclass(frozen=True)
class FrozenStorage:
    """How frozen weights are kept: `offload_embeddings` (trainer.offload_embeddings), `lm_head_bits` and
    `vision_tower_bits` (precision.*: 16, or 8 for int8 rows)."""

    offload_embeddings: bool = False
    lm_head_bits: int = 16
    vision_tower_bits: int = 16

    @property
    def any(self) -> bool:
        return self.offload_embeddings or self.lm_head_bits != 16 or self.vision_tower_bits != 16

    def describe(self) -> str:
        chosen = [("the input embedding table in host memory", self.offload_embeddings),
                  ("lm_head in int8 rows", self.lm_head_bits == 8), ("lm_head in NF4 rows", self.lm_head_bits == 4), ("the vision tower's linears in int8 rows", self.vision_tower_bits == 8)]
        return ", ".join(text for text, on in chosen if on) or "as loaded"

    def problems(self, policy: Any, tied_embeddings: bool | None = None) -> list[str]:
        """Why these settings cannot apply to a run of `policy` (empty when they can). tied_embeddings: whether the
        model ties lm_head to the input embeddings (None: not known yet, checked when the model is built)."""
        out = []
        if self.lm_head_bits not in (16, 8, 4):
            out.append(f"precision.lm_head_bits = {self.lm_head_bits!r}; use 16, 8 or 4")
        if self.vision_tower_bits not in (16, 8):
            out.append(f"precision.vision_tower_bits = {self.vision_tower_bits!r}; use 16 or 8")
        llm = policy.llm
        trains_llm_weights = method_of(llm).trains_base_weights
        if self.offload_embeddings:
            if trains_llm_weights or _targets(llm, "embed_tokens"):
                out.append(f"trainer.offload_embeddings keeps the frozen input embedding table in host memory, but "
                           f"adapters.llm.method = {llm.method} trains it; set trainer.offload_embeddings=false")
            if tied_embeddings:
                out.append("trainer.offload_embeddings: this model ties lm_head to the input embeddings (NVILA-Lite-2B), "
                           "so the table is lm_head's weight and must stay on the accelerator; set trainer.offload_embeddings=false")
        if self.lm_head_bits != 16:
            if trains_llm_weights or _targets(llm, "lm_head"):
                out.append(f"precision.lm_head_bits={self.lm_head_bits} stores a frozen lm_head, but adapters.llm "
                           f"({llm.method}{', targets lm_head' if _targets(llm, 'lm_head') else ''}) trains it; use precision.lm_head_bits=16")
            if tied_embeddings:
                out.append(f"precision.lm_head_bits={self.lm_head_bits}: this model ties lm_head to the input embeddings "
                           "(NVILA-Lite-2B); a quantized copy would add memory, not save it; use precision.lm_head_bits=16")
        if self.vision_tower_bits == 8 and not method_of(policy.vision_tower).plain_linears:
            out.append(f"precision.vision_tower_bits=8 stores a frozen or LayerNorm-tuned vision tower, but "
                       f"adapters.vision_tower.method = {policy.vision_tower.method}; use precision.vision_tower_bits=16")
        return out


def _targets(component: Any, module_name: str) -> bool:
    """Whether a LoRA component names the module among its targets (or its modules to save)."""
    if not method_of(component).trains_lora:
        return False
    named = component.target_modules if isinstance(component.target_modules, (list, tuple)) else []
    pattern = component.target_modules if isinstance(component.target_modules, str) else ""
    return module_name in named or module_name in pattern


def vision_linears(model: Any) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every linear in the vision tower's used encoder layers."""
    for layer in model.vision_tower.used_layers():
        for parent in layer.modules():
            for child_name, child in parent.named_children():
                if type(child) is nn.Linear:
                    yield parent, child_name, child


def store_frozen_weights(model: Any, storage: FrozenStorage) -> Any:
    """Apply the storage levers to a model whose adapter policy is applied (in place); returns the model."""
    base = base_module(model.llm)
    if storage.offload_embeddings and not isinstance(base.model.embed_tokens, HostEmbedding):
        base.model.embed_tokens = HostEmbedding(base.model.embed_tokens)
    if storage.lm_head_bits != 16 and type(base.lm_head) is nn.Linear:
        base.lm_head = (Int8RowLinear if storage.lm_head_bits == 8 else Nf4RowLinear).from_linear(base.lm_head)
    if storage.vision_tower_bits == 8:
        for parent, child_name, linear in list(vision_linears(model)):
            setattr(parent, child_name, Int8RowLinear.from_linear(linear))
    return model


def has_frozen_storage(model: Any) -> bool:
    return any(isinstance(m, (HostEmbedding, Int8RowLinear, Nf4RowLinear)) for m in model.modules())


def restore_frozen_storage(model: Any) -> int:
    """Put the checkpoint's own tensors back where the storage levers changed a layer (a merge then equals the
    one of a run without them); returns the layers restored. Reads the checkpoint at `model.name_or_path`."""
    from nvila_ft.model.checkpoint import iter_safetensors
    from nvila_ft.model.config import CheckpointError

    changed = [(name, module) for name, module in model.named_modules() if isinstance(module, (HostEmbedding, Int8RowLinear, Nf4RowLinear))]
    if not changed:
        return 0
    device, dtype = model.device, model.dtype
    root = Path(str(getattr(model, "name_or_path", "")))
    wanted: dict[str, dict[str, tuple[str, str]]] = {"llm": {}, "vision_tower": {}}  # folder -> key -> (module, tensor)
    for name, module in changed:
        folder, prefix = _checkpoint_prefix(name)
        tensors = ("weight", "bias") if getattr(module, "bias", None) is not None else ("weight",)
        wanted[folder] |= {f"{prefix}.{tensor}": (name, tensor) for tensor in tensors}
    found = {wanted[folder][key]: value for folder in wanted if wanted[folder]
             for key, value in iter_safetensors(root / folder, set(wanted[folder]))}
    missing = [key for folder in wanted for key, where in wanted[folder].items() if where not in found]
    if missing:
        raise CheckpointError(f"{root}: lacks {', '.join(missing[:3])}; weights kept in 8 bits or host memory are restored "
                              "from the checkpoint the model was loaded from")
    for name, module in changed:
        parent_name, _, child = name.rpartition(".")
        tensor = lambda which: nn.Parameter(found[(name, which)].to(device=device, dtype=dtype), requires_grad=False)  # noqa: E731
        if isinstance(module, HostEmbedding):
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx, device="meta")
        else:
            bias = getattr(module, "bias", None)
            plain = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
            if bias is not None:
                plain.bias = tensor("bias")
        plain.weight = tensor("weight")
        plain.train(module.training)
        setattr(model.get_submodule(parent_name), child, plain)
    return len(changed)


def _checkpoint_prefix(module_name: str) -> tuple[str, str]:
    """(checkpoint folder, key prefix there) of a module of the model: `llm.lm_head` -> ("llm", "lm_head"),
    `vision_tower.model.encoder.layers.0.mlp.fc1` -> ("vision_tower", "vision_model.encoder.layers.0.mlp.fc1")."""
    from nvila_ft.model.checkpoint import VISION_PREFIX

    component, _, rest = module_name.partition(".")
    rest = rest.replace("base_model.model.", "", 1)  # under a PEFT wrapper
    if component == "llm":
        return "llm", rest
    rest = rest.removeprefix("model.")  # VisionTower.model
    return "vision_tower", rest if rest.startswith(VISION_PREFIX) else VISION_PREFIX + rest
