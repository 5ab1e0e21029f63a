"""`nvila-ft plan`: will this run fit on the GPU, and if not, what is the cheapest change that makes it fit.

Takes the same overrides as `finetune`. Reads the checkpoint's config files only (or the released configuration
of `model=<name>` when no checkpoint is on disk), measures the task's records from their media headers, and
plans one GPU's memory at the p95 and the longest sample. Nothing heavy is loaded and no GPU is needed.
"""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nvila_ft.commands.common import build
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.checkpoint import resolve_checkpoint
from nvila_ft.model.config import NVILAConfig
from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
from nvila_ft.model.tokenizer import load_tokenizer
from nvila_ft.training import planner
from nvila_ft.training.config import ConfigError, DataOptions
from nvila_ft.training.planner import GIB, Plan, SequenceStats
from nvila_ft.training.planning import PlanOptions, estimate, one_line
from nvila_ft.training.run_checks import check_run


def model_config_and_processor(cfg: DictConfig, data: DataOptions) -> tuple[NVILAConfig, NVILAProcessor, str]:
    """The run's model configuration (`ModelSource.config`: its `model.<knob>` settings applied and checked) and
    processor, from config files only; without a checkpoint on disk (`model.path` unset), the configuration of
    the preset, its text counted with the tiny tokenizer (which gives more tokens than Qwen2's)."""
    node = cfg.model.copy()
    if OmegaConf.is_missing(node, "path"):
        node.path = None
    source = build(OmegaConf.create({"model": node}), "model")
    source.check()
    config = source.config()
    if source.path is not None:
        tokenizer_dir, where = resolve_checkpoint(source.path) / "llm", str(resolve_checkpoint(source.path))
    else:
        tokenizer_dir, where = TINY_TOKENIZER_DIR, f"preset {source.preset} (its configuration; no weights loaded)"
    processor = NVILAProcessor(load_tokenizer(tokenizer_dir, config.chat_template), config, **data.processor_options())
    return config, processor, where


def table(result: dict[str, Any], budget: int, budget_source: str, stats: SequenceStats, where: str, problems: list[str]) -> str:
    plans: dict[str, Plan] = result["plans"]
    p95 = plans["p95"]
    shape = p95.shape
    lines = [f"model: {where}",
             f"records measured: {len(stats.samples):,} of {stats.total:,}" + (f" ({len(problems)} could not be measured)" if problems else ""),
             "sequence    positions   tiles   supervised"]
    for q in ("p50", "p95", "max"):
        s = getattr(stats, q)
        lines.append(f"  {q:<8}{s.positions:>11,}{s.tiles:>8,}{s.supervised:>13,}")
    lines.append(f"run: micro-batch {shape.micro_batch}, weights {str(shape.weights_dtype).removeprefix('torch.')}, optimizer {shape.optim}, "
                 f"checkpointing {', '.join(shape.checkpointing) or 'off'}, ZeRO {shape.zero_stage or 'off'}, {shape.world_size} process(es)")
    lines.append("")
    unit, scale = ("GiB", GIB) if p95.total >= 2 * GIB else ("MiB", 2**20)
    lines.append(f"{'component':<14}{'item':<22}{'p95 ' + unit:>12}{'max ' + unit:>12}  note")
    rows: dict[tuple[str, str], list] = {}  # (component, item) -> [p95 bytes, max bytes, note], lines of both plans
    for column, name in ((0, "p95"), (1, "max")):
        for line in plans[name].lines:
            row = rows.setdefault((line.component, line.item), [0, 0, line.note])
            row[column] += line.bytes
    for (component, item), (at_p95, at_max, note) in rows.items():
        lines.append(f"{component:<14}{item:<22}{at_p95 / scale:>12.2f}{at_max / scale:>12.2f}  {note}")
    lines.append(f"{'total':<36}{p95.total / scale:>12.2f}{plans['max'].total / scale:>12.2f}  peak: steady + max(activation phase, gradient phase)")
    lines.append("")
    lines.append(f"GPU: {planner.gib(budget)} ({budget_source})")
    lines.append(one_line(plans, budget))
    if result["changes"]:
        lines.append("changes, cheapest first, applied together until the longest sample fits:")
        for row in result["changes"]:
            mark = "fits" if row["fits"] else ""
            lines.append(f"  {' '.join(row['overrides']):<48} alone {row['alone_bytes'] / GIB:6.2f}  together {row['together_bytes'] / GIB:6.2f} GiB"
                         f"  {mark:<5} {row['change']} (cost: {row['cost']})")
        if not result["changes"][-1]["fits"]:
            lines.append("  no combination of these fits: more processes with ZeRO-3, or a GPU with more memory")
    for problem in problems[:5]:
        lines.append(f"not measured: {problem}")
    return "\n".join(lines)


def as_json(result: dict[str, Any], budget: int, budget_source: str, stats: SequenceStats, where: str, problems: list[str]) -> str:
    plans: dict[str, Plan] = result["plans"]
    return json.dumps({
        "model": where,
        "records": {"total": stats.total, "measured": len(stats.samples), "unmeasured": problems},
        "sequence": {q: vars(getattr(stats, q)) for q in ("p50", "p95", "max")},
        "gpu_bytes": budget, "gpu": budget_source,
        "plans": {q: {"total_bytes": p.total, "fits": p.total <= budget,
                      "lines": [{"component": l.component, "item": l.item, "bytes": l.bytes, "note": l.note} for l in p.lines]}
                  for q, p in plans.items()},
        "changes": result["changes"],
    }, indent=1)


DOES_NOT_FIT = 3  # the exit code of `nvila-ft plan` when the longest sample does not fit (1: a user error)


def plan(cfg: DictConfig) -> int:
    """Prints the plan; returns 0 when the longest sample fits, DOES_NOT_FIT when it does not."""
    policy, precision, trainer, deepspeed = build(cfg, "adapters"), build(cfg, "precision"), build(cfg, "trainer"), build(cfg, "deepspeed")
    data, task = build(cfg, "data"), build(cfg, "task")
    options: PlanOptions = build(cfg, "plan")
    if policy is None:
        raise ConfigError("plan needs an adapter policy (adapters=<preset>)")
    check_run(policy, precision, trainer, deepspeed)
    _, processor, where = model_config_and_processor(cfg, data)
    loaded = task.load(cfg.seed)
    records = loaded.train
    if not records:
        path = getattr(task.train, "path", None)
        bad = [e for e in loaded.errors if path is None or e.origin.startswith(str(path))]
        raise ConfigError("plan: no training record to measure" + (f" in {path} (task.train.path)" if path else "")
                          + (f": {len(bad)} malformed, first: {bad[0].line()}" if bad else ""))
    result, stats, problems = estimate(policy, precision, trainer, deepspeed, data, records, processor, options, cfg.seed)
    budget, source = options.budget()
    print(as_json(result, budget, source, stats, where, problems) if options.json else table(result, budget, source, stats, where, problems))
    return 0 if result["plans"]["max"].total <= budget else DOES_NOT_FIT
