"""Linears whose frozen weight is stored in float8 (`fp8_lora`) without a 16-bit copy kept for backward, and
plain linears back where FP8 compute (`precision.fp8`, torchao `Float8Linear`) swapped them (before a merge).

torchao's float8 weight-only tensors dequantize above autograd, so a plain `F.linear` saves the dequantized 16-bit
weight for the input gradient: every float8 layer holds a 16-bit copy of itself until backward, and the run uses
more memory than with 16-bit weights. Here the weight is dequantized inside an autograd function that saves the
float8 tensor itself and dequantizes it again in backward, the same arithmetic without the copies.
"""

from __future__ import annotations

import torch
from torch import nn


class _Float8WeightLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the float8 tensor: no copy
        ctx.input_dtype = inputs.dtype
        out = torch.matmul(inputs, weight.dequantize().to(inputs.dtype).t())  # as torchao's weight-only linear
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # the weight is frozen: only the input's gradient
        (weight,) = ctx.saved_tensors
        grad_input = grad.to(ctx.input_dtype) @ weight.dequantize().to(ctx.input_dtype)
        return grad_input, None, None


class Float8StorageLinear(nn.Linear):
    """An `nn.Linear` with a frozen float8 weight (torchao) that keeps no dequantized copy for backward."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(inputs.device.type):  # as autocast would run the linear
            inputs = inputs.to(torch.get_autocast_dtype(inputs.device.type))
        bias = self.bias.to(inputs.dtype) if self.bias is not None else None
        return _Float8WeightLinear.apply(inputs, self.weight, bias)


def keep_float8_for_backward(linear: nn.Linear) -> None:
    """Make a frozen float8-weight linear save its float8 weight, not a dequantized copy, for backward."""
    if linear.weight.requires_grad or (linear.bias is not None and linear.bias.requires_grad):
        raise ValueError("float8 weight storage is for frozen linears")
    linear.__class__ = Float8StorageLinear


def restore_linears(model: nn.Module) -> int:
    """Swap every `Float8Linear` back for a plain `nn.Linear` holding the same parameters; returns how many."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Float8Linear":
            continue
        with torch.device("meta"):
            plain = nn.Linear(module.in_features, module.out_features, bias=False)
        plain.weight, plain.bias = module.weight, module.bias
        plain.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
        swapped += 1
    return swapped
