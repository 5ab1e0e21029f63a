"""Planning a training run's GPU memory from its settings and (a sample of) its records, before anything heavy
loads: the plan at p50, p95 and the longest sample, the cheapest changes that make the longest fit, and the
one-line estimate a training run logs at start. `nvila-ft plan` prints it; finetune logs it. The memory model
itself is `nvila_ft.training.planner`.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from nvila_ft.adapters.policy import PolicyError
from nvila_ft.data.packing import PackingError, pack_first_fit_decreasing
from nvila_ft.data.processor import NVILAProcessor, SampleError
from nvila_ft.data.records import Record
from nvila_ft.model.config import NVILAConfig
from nvila_ft.training import planner
from nvila_ft.training.config import ConfigError, DataOptions, Precision, TrainerConfig
from nvila_ft.training.deepspeed import DeepSpeedConfig
from nvila_ft.training.planner import GIB, Plan, RunShape, SampleDemand, SequenceStats
from nvila_ft.training.run_checks import check_run

log = logging.getLogger("nvila_ft")

DEFAULT_GPU_GIB = 24.0  # when no GPU is visible: the common 24 GB card (RTX 4090 / A10 / L4)
MAX_GPU_GIB = 1024  # far above any one GPU; a larger figure is a mistake (bytes given for GiB)


@dataclass
class PlanOptions:
    """The `plan:` section. gpu_memory: GiB of one GPU (None: the visible GPU, else 24); samples: records
    measured (None: all); world_size: processes of the run (None: 1, or the launcher's WORLD_SIZE in finetune);
    json: print the plan as JSON instead of a table."""

    gpu_memory: float | None = None
    samples: int | None = 2000
    world_size: int | None = None
    json: bool = False

    def __post_init__(self) -> None:
        if self.gpu_memory is not None and not 0 < self.gpu_memory <= MAX_GPU_GIB:
            raise ConfigError(f"plan.gpu_memory = {self.gpu_memory:g}: GiB of one GPU, above 0 and at most {MAX_GPU_GIB} "
                              "(e.g. plan.gpu_memory=24 or 80; not bytes)")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"plan.samples = {self.samples}: must be >= 1, or null for every record")
        if self.world_size is not None and self.world_size < 1:
            raise ConfigError(f"plan.world_size = {self.world_size}: must be >= 1")

    def budget(self) -> tuple[int, str]:
        """Bytes of one GPU and where the figure comes from."""
        if self.gpu_memory is not None:
            return int(self.gpu_memory * GIB), "plan.gpu_memory"
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
        return int(DEFAULT_GPU_GIB * GIB), "no GPU visible: a 24 GB card (plan.gpu_memory=<GiB> to change)"

    def processes(self) -> int:
        return self.world_size or int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------------------------------------- inputs
def run_shape(precision: Precision, trainer: TrainerConfig, deepspeed: Any, world_size: int, cuda: bool = True) -> RunShape:
    """The planner's view of a run's settings."""
    return RunShape(
        weights_dtype=precision.dtype,
        trainable_float32=precision.trainable_float32,
        micro_batch=trainer.per_device_train_batch_size,
        checkpointing=trainer.checkpointed_components(),
        optim=trainer.optim,
        zero_stage=deepspeed.stage if deepspeed is not None else 0,
        offload_optimizer=bool(deepspeed and deepspeed.offload_optimizer),
        offload_params=bool(deepspeed and deepspeed.offload_params),
        world_size=world_size,
        selective_loss=trainer.selective_loss,
        gradient_accumulation=trainer.gradient_accumulation_steps,
        offload_activations=trainer.offload_activations,
        cuda=cuda,
        offload_embeddings=trainer.offload_embeddings,
        lm_head_bits=precision.lm_head_bits,
        vision_tower_bits=precision.vision_tower_bits,
    )


def measure_records(records: list[Record], processor: NVILAProcessor) -> tuple[list[SampleDemand], list[str]]:
    """Sizes of the records from their media headers; the records that cannot be measured are returned as
    one-line reasons (the data check reports them in full)."""
    sizes, problems = [], []
    for record in records:
        try:
            size = processor.measure(record.messages, record.name, record.media_root)
        except (SampleError, ValueError, OSError) as err:
            text = str(err)  # the processor's errors start with the record's name already
            problems.append(text if text.startswith(record.origin) else f"{record.origin}: {text}")
            continue
        sizes.append(SampleDemand(min(size.positions, processor.model_max_length), size.tiles, size.supervised))
    return sizes, problems


def packed_rows(samples: list[SampleDemand], max_tokens: int) -> list[SampleDemand]:
    """With data.packing: the rows training sees (first-fit decreasing, as the packed sampler packs)."""
    rows = pack_first_fit_decreasing([s.positions for s in samples], max_tokens)
    return [SampleDemand(sum(samples[i].positions for i in row), sum(samples[i].tiles for i in row),
                         sum(samples[i].supervised for i in row)) for row in rows]


# ---------------------------------------------------------------------------------------------- the plan
def plan_run(config: NVILAConfig, policy: Any, stats: SequenceStats, shape: RunShape, budget: int,
             longest_for: Callable[[NVILAConfig], SampleDemand], runnable: Callable[[Any, RunShape], bool]) -> dict[str, Any]:
    """Plans at p50, p95 and the longest sample, and the cheapest changes that make the longest fit.
    `longest_for(config)`: the longest sample under a changed model configuration (fewer tiles);
    `runnable(policy, shape)`: whether finetune would accept a changed run."""
    model = planner.meta_model(config, policy, shape.weights_dtype, shape.lora_float32, shape.storage)
    plans = {q: planner.plan(config, policy, getattr(stats, q), shape, model=model) for q in ("p50", "p95", "max")}
    models = {_model_key(policy, shape): model}
    return {"plans": plans, "changes": fitting_changes(config, policy, shape, budget, plans["max"].total, longest_for, runnable, models)}


def _model_key(policy: Any, shape: RunShape) -> tuple:
    """What a meta model depends on (building one takes seconds at 8B)."""
    return (repr(policy), shape.weights_dtype, shape.lora_float32, shape.storage)


def fitting_changes(config: NVILAConfig, policy: Any, shape: RunShape, budget: int, current: int,
                    longest_for: Callable[[NVILAConfig], SampleDemand], runnable: Callable[[Any, RunShape], bool],
                    models: dict[tuple, Any] | None = None) -> list[dict[str, Any]]:
    """Each candidate change alone, and applied together in order of cost until the plan fits (so the list ends
    at the cheapest combination that fits, when one exists). A change that saves nothing, or that would make a
    run finetune refuses, is left out."""
    if current <= budget:
        return []

    models = {} if models is None else models  # meta models by _model_key

    def total(applied: tuple[Any, RunShape, NVILAConfig]) -> int:
        new_policy, new_shape, new_config = applied
        key = _model_key(new_policy, new_shape)
        if key not in models:
            models[key] = planner.meta_model(new_config, new_policy, new_shape.weights_dtype, new_shape.lora_float32, new_shape.storage)
        return planner.plan(new_config, new_policy, longest_for(new_config), new_shape, model=models[key]).total

    rows, together = [], (policy, shape, config)
    for change in planner.changes(policy, shape, config):
        alone = change.apply(policy, shape, config)
        combined = change.apply(*together)
        if not runnable(combined[0], combined[1]):
            continue
        alone_bytes = total(alone)
        if alone_bytes >= current:
            continue  # saves nothing here
        together = combined
        together_bytes = total(together)
        rows.append({"overrides": change.overrides, "change": change.description, "cost": change.cost,
                     "alone_bytes": alone_bytes, "together_bytes": together_bytes, "fits": together_bytes <= budget})
        if together_bytes <= budget:
            break
    return rows


def one_line(plans: dict[str, Plan], budget: int | None) -> str:
    """The estimate in one line: what finetune prints at start."""
    p95, longest = plans["p95"], plans["max"]
    text = (f"planned GPU memory: {planner.gib(p95.total)} at the p95 sample ({p95.sample.positions:,} positions), "
            f"{planner.gib(longest.total)} at the longest ({longest.sample.positions:,})")
    if budget is not None:
        verdict = "fits" if longest.total <= budget else "fits at p95 only" if p95.total <= budget else "does not fit"
        text += f" of {planner.gib(budget)}: {verdict}"
    return text


def estimate(policy: Any, precision: Precision, trainer: TrainerConfig, deepspeed: Any, data: DataOptions,
             records: list[Record], processor: NVILAProcessor, options: PlanOptions, seed: int) -> tuple[dict[str, Any], SequenceStats, list[str]]:
    """The plan of a run over (a sample of) its training records."""
    chosen = records if options.samples is None or len(records) <= options.samples else random.Random(seed).sample(records, options.samples)

    def demands(proc: NVILAProcessor) -> tuple[list[SampleDemand], list[str]]:
        samples, problems = measure_records(chosen, proc)
        longest = max((s.positions for s in samples), default=0)
        if data.packing and longest > data.max_tokens:  # packing's own error would count the measured list, not records
            count = sum(s.positions > data.max_tokens for s in samples)
            raise ConfigError(f"plan: {count} of the {len(samples)} records measured are longer than data.max_tokens = "
                              f"{data.max_tokens} (the longest: {longest:,} positions); raise data.max_tokens to at least {longest}")
        if data.packing and samples:
            try:
                samples = packed_rows(samples, data.max_tokens)
            except PackingError as err:
                raise ConfigError(f"plan: {err}") from err
        return samples, problems

    samples, problems = demands(processor)
    if not samples:
        raise ConfigError("plan: no training record could be measured" + (f" (first: {problems[0]})" if problems else ""))
    stats = SequenceStats(samples, len(records))

    def longest_for(config: NVILAConfig) -> SampleDemand:
        if config is processor.config:
            return stats.max
        return SequenceStats(demands(processor.with_config(config))[0], len(records)).max

    def runnable(new_policy: Any, new_shape: RunShape) -> bool:
        new_deepspeed = DeepSpeedConfig(stage=new_shape.zero_stage, offload_optimizer=new_shape.offload_optimizer,
                                        offload_params=new_shape.offload_params)
        try:
            check_run(new_policy, replace(precision, trainable_float32=new_shape.trainable_float32),
                      replace(trainer, optim=new_shape.optim), new_deepspeed)
        except (ConfigError, PolicyError):
            return False
        return True

    shape = run_shape(precision, trainer, deepspeed, options.processes())
    budget, _ = options.budget()
    return plan_run(processor.config, policy, stats, shape, budget, longest_for, runnable), stats, problems


def log_estimate(policy: Any, precision: Precision, trainer: TrainerConfig, deepspeed: Any, data: DataOptions,
                 records: list[Record], processor: NVILAProcessor, options: PlanOptions, seed: int) -> None:
    """The one-line estimate a training run logs at start (200 records at most), and a warning when the run will not fit
    the visible GPU (or `plan.gpu_memory`) with the changes that would make it fit. Never stops the run."""
    options = replace(options, samples=min(options.samples or 200, 200))
    try:
        result, _, _ = estimate(policy, precision, trainer, deepspeed, data, records, processor, options, seed)
    except Exception as err:  # noqa: BLE001 - the estimate is advice; it never stops the run
        log.warning("no memory plan for this run: %s", err)
        return
    judged = torch.cuda.is_available() or options.gpu_memory is not None
    budget = options.budget()[0] if judged else None
    plans = result["plans"]
    log.info("%s", one_line(plans, budget))
    if budget is not None and plans["max"].total > budget:
        fix = " ".join(dict.fromkeys(o for row in result["changes"] for o in row["overrides"]))
        log.warning("this run is planned above the GPU's memory%s (nvila-ft plan <same overrides> shows why)",
                    f"; to fit: {fix}" if fix and result["changes"][-1]["fits"] else "")
