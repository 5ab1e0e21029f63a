"""What the memory planner (`planner`) takes and gives: the samples and the run's shape in, lines of bytes out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nvila_ft.adapters.frozen_storage import FrozenStorage

GIB = 2**30
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


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


