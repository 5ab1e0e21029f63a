"""The model a run trains or evaluates: its base checkpoint, quantized as the adapter policy needs, with fresh or
saved adapters, and its processor."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy
from nvila_ft.adapters.artifacts import load_adapters, read_policy
from nvila_ft.adapters.frozen_storage import FrozenStorage, store_frozen_weights
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.source import ModelSource
from nvila_ft.recipes.runs import BASE_DIR
from nvila_ft.training.config import ConfigError, Precision

log = logging.getLogger("nvila_ft")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Loaded:
    model: NVILAForConditionalGeneration
    processor: NVILAProcessor
    checkpoint: Path


def load_model(
    source: ModelSource,
    run_dir: Path,
    precision: Precision,
    policy: AdapterPolicy | None = None,
    adapters: Path | None = None,
    trainable: bool = False,
    processor_options: dict[str, Any] | None = None,
    storage: FrozenStorage | None = None,
) -> Loaded:
    """Base checkpoint (presets are built into `<run_dir>/base` once), quantized as the policy needs, then either
    fresh adapters (`policy`) or saved ones (`adapters`); `processor_options`: NVILAProcessor arguments; `storage`:
    where the frozen weights are kept (the run's levers, checked by `check_run`; the tie of lm_head is checked here)."""
    checkpoint = source.checkpoint(run_dir / BASE_DIR)
    if adapters is not None:
        policy, _ = read_policy(adapters)
    if policy is not None:
        model = load_for_policy(checkpoint, policy, precision.dtype, device(), source.attn_implementation)
    else:
        model = NVILAForConditionalGeneration.from_pretrained(
            checkpoint, dtype=precision.dtype, attn_implementation=source.attn_implementation, device=device()
        )
    if adapters is not None:
        load_adapters(model, adapters, is_trainable=trainable)
    elif policy is not None:
        apply_policy(model, policy)
    if policy is not None and precision.dtype != torch.float32:
        # DeepSpeed flattens every trainable tensor into one buffer of the model dtype (and keeps float32 master
        # copies itself); without it, trainable tensors are kept in float32 when precision.trainable_float32
        target = precision.dtype if _deepspeed_configured() else torch.float32 if precision.trainable_float32 else None
        for param in model.parameters():
            if target is not None and param.requires_grad and param.is_floating_point() and not hasattr(param, "ds_id"):
                param.data = param.data.to(target)
    if storage is not None and storage.any and policy is not None:
        problems = storage.problems(policy, tied_embeddings=bool(model.config.llm.get("tie_word_embeddings", False)))
        if problems:
            raise ConfigError(problems[0])
        store_frozen_weights(model, storage)
        log.info("frozen weights kept: %s", storage.describe())
    return Loaded(model, NVILAProcessor.from_pretrained(checkpoint, **(processor_options or {})), checkpoint)


def _deepspeed_configured() -> bool:
    """Whether this process trains with DeepSpeed (the Trainer's arguments carry its configuration)."""
    from transformers.integrations.deepspeed import deepspeed_config

    return deepspeed_config() is not None
