"""`nvila-ft export run=<dir>`: the run's merged model in the official NVILA layout (verified on a probe batch),
or its adapter-only artifacts (export.merge=false)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig

from nvila_ft.adapters.merge import export_merged
from nvila_ft.atomic import atomic_directory
from nvila_ft.commands.common import build, log, run_config
from nvila_ft.recipes.loading import load_model
from nvila_ft.recipes.runs import trained_adapters
from nvila_ft.training.config import ConfigError
from nvila_ft.training.cpu_threads import set_cpu_threads


def probe_batch(processor, task, seed: int):
    """Two validation records of the run's task as a probe (a text-only prompt when there are none)."""
    try:
        records = task.load(seed).validation[:2]
    except Exception:  # noqa: BLE001 - the data may be gone; a text probe still checks the LLM merge
        records = []
    samples = []
    for record in records:
        try:
            samples.append(processor.process(record.messages, sample_id=record.name, media_root=record.media_root))
        except ValueError:
            continue
    if not samples:
        conversation = [{"role": "user", "content": "Describe the weather."}, {"role": "assistant", "content": "Sunny."}]
        samples = [processor.process(conversation)]
    return processor.collate(samples)


def export(cfg: DictConfig) -> str:
    if not cfg.run:
        raise ConfigError("export needs run=<run directory>")
    run = Path(cfg.run).absolute()
    options = cfg.export
    cfg = run_config(run, cfg)
    adapters = trained_adapters(run)
    default_name = "export-merged" if options.merge else "export-adapters"
    output = Path(options.output or run / default_name).absolute()
    if output.exists() and not options.overwrite:
        raise ConfigError(f"{output} exists; pass export.overwrite=true to replace it")
    if not options.merge:
        with atomic_directory(output, overwrite=options.overwrite) as staging:
            shutil.copytree(adapters, staging, dirs_exist_ok=True)
        log.info("adapters written to %s", output)
        return str(output)
    precision, source, task = build(cfg, "precision"), build(cfg, "model"), build(cfg, "task")
    set_cpu_threads(cfg.cpu_threads)
    loaded = load_model(source, run, precision, adapters=adapters, processor_options=build(cfg, "data").processor_options())
    dtype = getattr(torch, options.dtype) if options.dtype else None
    report = export_merged(
        loaded.model,
        output,
        probe_batch(loaded.processor, task, cfg.seed),
        qlora_merge=options.qlora_merge,
        dtype=dtype,
        tolerance=options.tolerance,
        overwrite=options.overwrite,
    )
    log.info(
        f"merged model written to {report.path}\n"
        f"probe check: max |logit difference| {report.max_abs_diff:.3g} vs the {report.reference} "
        f"(tolerance {report.tolerance:.3g})"
        + (f"; gap between the model as trained and its 16-bit counterpart {report.quantization_gap:.3g}"
           if report.quantization_gap is not None else "")
    )
    return str(report.path)
