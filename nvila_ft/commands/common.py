"""What every command needs: building config objects, finding a run's pieces, loading model + processor."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy
from nvila_ft.adapters.artifacts import POLICY_FILE, load_adapters
from nvila_ft.adapters.frozen_storage import FrozenStorage, store_frozen_weights
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.validation import TaskDataCheck
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.source import ModelSource
from nvila_ft.training.config import ConfigError, Precision

log = logging.getLogger("nvila_ft")
FINAL_DIR = "final"
BASE_DIR = "base"


def build(cfg: DictConfig, where: str) -> Any:
    """Instantiate the config node `cfg.<where>` (`_target_` + arguments); None or an empty node
    (`adapters=none`) is None. Values are checked against the built object's annotations first, and a
    constructor's own ValueError/TypeError becomes a ConfigError naming the node."""
    node = cfg.get(where)
    if node is None or len(node) == 0:
        return None
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from nvila_ft.commands.config_types import check_node

    check_node(node, where)
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            message = str(cause)
            raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from cause
        raise


def check_run(policy: AdapterPolicy, precision: Precision, trainer: Any, deepspeed: Any) -> None:
    """The checks a training run passes before anything loads (finetune; plan, for its run and its suggestions)."""
    precision.check()
    trainer.check()
    deepspeed.check(precision)
    policy.check(precision=precision, deepspeed=deepspeed)
    storage = frozen_storage(precision, trainer)
    problems = storage.problems(policy)
    if problems:
        raise ConfigError(problems[0])
    if storage.any and deepspeed.enabled:
        raise ConfigError("trainer.offload_embeddings and precision.lm_head_bits / vision_tower_bits are levers of runs "
                          "without DeepSpeed (it casts every floating tensor of the model to its dtype, and ZeRO-3 shards "
                          "frozen weights itself); set them back to false / 16, or use deepspeed=none")
    if deepspeed.offload_optimizer and trainer.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ConfigError(f"trainer.optim = {trainer.optim}: ZeRO-Offload steps DeepSpeed's CPU Adam; use adamw_torch, "
                          "or a deepspeed option without offload")


def frozen_storage(precision: Precision, trainer: Any) -> FrozenStorage:
    """Where a run keeps its frozen weights (trainer.offload_embeddings, precision.lm_head_bits / vision_tower_bits)."""
    return FrozenStorage(trainer.offload_embeddings, precision.lm_head_bits, precision.vision_tower_bits)


def checkpoint_to_resume(run_dir: Path) -> str:
    """The newest complete checkpoint of a run (trainer.resume=true). The main process first removes the folders a
    stop left half-written (only one process, or they race over the same files); the choice does not depend on it."""
    from nvila_ft.training.deepspeed import is_main_process
    from nvila_ft.training.trainer import complete_checkpoints, remove_incomplete_checkpoints

    for folder in remove_incomplete_checkpoints(run_dir) if is_main_process() else []:
        log.warning("removed %s: the run was stopped while it was being written", folder)
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        raise ConfigError(f"trainer.resume=true but {run_dir} has no complete checkpoint to resume from")
    return str(checkpoints[-1])


def plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def seed_everything(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed = {seed!r}: expected an integer")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state between jobs of a sweep run in one process."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # noqa: BLE001 - nothing to reset
        pass


@dataclass
class Loaded:
    model: NVILAForConditionalGeneration
    processor: NVILAProcessor
    checkpoint: Path


def report_data_check(check: TaskDataCheck, report_file: Path, on_bad_record: str) -> None:
    """Write the data report; show the summaries and the first 20 bad records; stop if data.on_bad_record=stop.
    In a distributed run every process checked the same records; the first one reports."""
    from nvila_ft.training.deepspeed import is_main_process

    if is_main_process():
        report_file.parent.mkdir(parents=True, exist_ok=True)
        report_file.write_text(check.text())
        log.info("\n".join(check.summaries()))
    if check.bad and is_main_process():
        lines = [b.line() for b in check.bad]
        more = f"\n... ({len(lines) - 20} more in {report_file})" if len(lines) > 20 else ""
        log.warning("%d bad records, skipped:\n%s%s", len(lines), "\n".join(lines[:20]), more)
    if check.bad and on_bad_record == "stop":
        raise ConfigError(f"{len(check.bad)} bad records (data.on_bad_record=stop); see {report_file}")


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
        policy = AdapterPolicy.from_dict(json.loads((adapters / POLICY_FILE).read_text())["policy"])
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


def trained_adapters(run: Path) -> Path:
    """The adapters a run produced: `final/`, else those of its last complete checkpoint."""
    from nvila_ft.training.trainer import ADAPTERS_DIR, complete_checkpoints

    if (run / FINAL_DIR / POLICY_FILE).is_file():
        return run / FINAL_DIR
    checkpoints = complete_checkpoints(run)
    if checkpoints:
        return checkpoints[-1] / ADAPTERS_DIR
    raise ConfigError(f"{run}: no trained adapters (no {FINAL_DIR}/ and no complete checkpoint-*/)")


def run_config(run: str | Path, current: DictConfig) -> DictConfig:
    """A run's configuration as it ran, with this command's own overrides on top.

    The run's `.hydra/config.yaml` holds every group already composed, so a run made with the user's own task or
    policy folder (`hydra.searchpath`) needs nothing outside its directory. Each key this command overrode on
    its command line (a group such as `task=...` or a value such as `eval.max_records=4`) is taken from
    `current`, the configuration Hydra composed for this command.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run = Path(run)
    saved_file = run / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"{run}: not an nvila-ft run directory (no .hydra/config.yaml)")
    saved = OmegaConf.load(saved_file)
    choices = _group_choices(run)
    OmegaConf.set_struct(saved, False)
    for override in OverridesParser.create().parse_overrides(cli_overrides()):
        key = override.key_or_group
        if key in ("run", "run_dir") or key.startswith("hydra") or override.package:
            continue
        if key in choices and override.value() == choices[key]:
            continue  # the group the run already used, with the run's own settings of it
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(saved, parent) if parent else saved
            if isinstance(node, DictConfig):
                node.pop(leaf, None)
            continue
        OmegaConf.update(saved, key, OmegaConf.select(current, key), merge=False, force_add=True)
    _add_missing_settings(saved, current, skip=set(choices))
    saved.run, saved.run_dir = str(run), str(run)
    OmegaConf.set_struct(saved, True)
    return saved


def _add_missing_settings(saved: DictConfig, current: DictConfig, skip: set[str]) -> None:
    """Settings a run made by an older nvila-ft lacks (new in this version) get this version's defaults; the
    groups it was composed from (`skip`) are the run's own and are left as they are."""
    for key in current:
        if key in skip:
            continue
        if key not in saved:
            saved[key] = current[key]
        elif isinstance(saved[key], DictConfig) and isinstance(current[key], DictConfig):
            _add_missing_settings(saved[key], current[key], set())


def _group_choices(run: Path) -> dict[str, str]:
    """{group: option} the run was composed from (`task: vqa`, ...), from its `.hydra/hydra.yaml`."""
    hydra_file = run / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices", default=None) or {}
    return {str(k): str(v) for k, v in choices.items()}


def cli_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [str(o) for o in HydraConfig.get().overrides.task]
