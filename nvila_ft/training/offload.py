"""Activations kept for backward in CPU memory (`trainer.offload_activations`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter, or a view of one (linear layers save `weight.t()`)."""
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)


class offloaded_activations(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 - a context, like torch's own
    """Every tensor autograd saves for backward inside the context is copied to CPU memory (pinned when `pin_memory`)
    and copied back to its device in backward, as `torch.autograd.graph.save_on_cpu` does, except parameters and
    their views, which stay where they are (copying frozen weights out every step would cost time, not save memory).

    With gradient checkpointing only the checkpointed layers' inputs and the tensors outside checkpointed layers
    are saved, so those are what move.
    """

    def __init__(self, pin_memory: bool = False) -> None:
        def pack(tensor: torch.Tensor) -> Any:
            if _is_parameter(tensor) or type(tensor) is not torch.Tensor:  # quantized / sharded subclasses stay
                return tensor
            packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin_memory)
            packed.copy_(tensor, non_blocking=pin_memory)
            return tensor.device, packed

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, tensor = packed
            return tensor.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)
