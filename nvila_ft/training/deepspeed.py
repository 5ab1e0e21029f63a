"""DeepSpeed ZeRO configuration for the HF Trainer integration, and the checks that must pass before a GPU is busy.

nvila-ft builds the config and lets transformers/DeepSpeed do the distributed work; "auto" values are
filled by the Trainer from TrainingArguments (batch sizes, clipping, precision).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from nvila_ft.training.config import ConfigError, Precision


@dataclass
class DeepSpeedConfig:
    """stage 0 = DeepSpeed off; 2 = shard optimizer states + gradients; 3 = shard parameters too."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    gather_16bit_weights_on_model_save: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.stage > 0

    def check(self, precision: Precision) -> None:
        """This config's own settings; what an adapter policy cannot do under it its methods check
        (`AdapterPolicy.check(deepspeed=...)`)."""
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.stage = {self.stage}; use 0 (off), 1, 2 or 3")
        if not self.enabled:
            return
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"deepspeed={self.stage} needs the deepspeed package ({err}); pip install deepspeed") from err
        if self.offload_params and self.stage != 3:
            raise ConfigError("deepspeed.offload_params needs stage 3 (ZeRO-3); use deepspeed=zero3_offload")
        if precision.autocast == "fp16" and not _cuda():
            raise ConfigError("DeepSpeed on CPU supports bf16 or fp32, not fp16")

    def to_dict(self) -> dict[str, Any]:
        """The config passed as `TrainingArguments(deepspeed=...)`."""
        zero: dict[str, Any] = {
            "stage": self.stage,
            "overlap_comm": self.overlap_comm,
            "contiguous_gradients": self.contiguous_gradients,
            "reduce_bucket_size": "auto",
        }
        if self.stage == 3:
            zero.update(
                stage3_prefetch_bucket_size="auto",
                stage3_param_persistence_threshold="auto",
                stage3_max_live_parameters=1e9,
                stage3_max_reuse_distance=1e9,
                stage3_gather_16bit_weights_on_model_save=self.gather_16bit_weights_on_model_save,
            )
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": _cuda()}
        if self.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": _cuda()}
        config = {
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "zero_optimization": zero,
            # nvila-ft builds the optimizer (per-component groups); DeepSpeed's CPU Adam is used when offloading
            "zero_force_ds_cpu_optimizer": False,
            # ... which may be bitsandbytes' 8-bit / paged AdamW (trainer.optim), not on DeepSpeed's tested list
            "zero_allow_untested_optimizer": True,
        }
        config.update(self.extra)
        return config


def ensure_single_process_env() -> None:
    """DeepSpeed needs torch.distributed variables even for one process; set them when no launcher did."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def join_deepspeed_comm() -> None:
    """Let DeepSpeed's communication layer use the process group the Trainer's arguments set up, before weights
    load: ZeRO-3 partitions them at load time and must know every process then."""
    import deepspeed

    deepspeed.init_distributed()


def gathered_parameters(model: Any, modifier_rank: int | None = None) -> Any:
    """A context in which ZeRO-3-sharded parameters are whole (a no-op otherwise): to generate, or, with
    modifier_rank=0, to write values on process 0 that are re-sharded on exit."""
    import contextlib

    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=modifier_rank)


def master_trainable_state(model: Any, keep: bool = True) -> dict[str, Any]:
    """The trainable tensors by state-dict name, whole and in float32, from DeepSpeed's optimizer: its float32 master
    copies are the trained values (the model's own parameters are 16-bit copies under bf16/fp16, shards under ZeRO-3).
    Every process must call it (each tensor is gathered from the processes' partitions); only one with `keep` holds
    the result, on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = safe_get_full_fp32_param(param)
            if value is None:
                raise RuntimeError(f"{name} is trainable but DeepSpeed's optimizer holds no float32 copy of it")
            if keep:
                state[name] = value.detach().to("cpu", torch.float32)
    return state


def set_master_weight(param: Any, value: Any) -> None:
    """Write a trainable parameter's whole float32 value into DeepSpeed's master copy (each process keeps its own
    partition of it; no communication)."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value.float())


def end_distributed() -> None:
    """At the end of a multi-process run: wait for every process, then close the process group (a process that
    exits with it open can abort in gloo's teardown while the others still talk)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
