"""Plain LoRA, rsLoRA, PiSSA and LoRA+ side by side on the demo: held-out accuracy, trainable parameters, step time.

Each method is its LN / <method> preset (`adapters/ln_vit_<method>_llm.yaml`: vision LayerNorms at 0.1x the learning
rate, projector full, the method on the LLM), fine-tuned with `nvila-ft finetune` on the demo's defaults (the tiny
embedded NVILA, the built-in shapes data, its held-out split), each run in its own process and run directory:

    .venv/bin/python bench/adapter_methods.py                           # the demo's 300 steps per method
    .venv/bin/python bench/adapter_methods.py --steps 5 --records 64 --eval-records 8   # a quick check that it runs
    .venv/bin/python bench/adapter_methods.py --extra trainer.learning_rate=5e-4 adapters.llm.r=32

Step time is the Trainer's train runtime over its steps (evaluation excluded); accuracy is the task's objective on
the held-out records before and after training.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = {"lora": "ln_vit_lora_llm", "rslora": "ln_vit_rslora_llm", "pissa": "ln_vit_pissa_llm", "loraplus": "ln_vit_loraplus_llm"}


def finetune(preset: str, out: Path, steps: int | None, records: int | None, eval_records: int | None, extra: list[str]) -> dict:
    overrides = [f"adapters={preset}", f"hydra.run.dir={out}", "trainer.save_steps=100000", *extra]
    overrides += [f"trainer.max_steps={steps}"] if steps else []
    overrides += [f"task.train.num_records={records}"] if records else []
    overrides += [f"eval.max_records={eval_records}"] if eval_records else []
    command = [sys.executable, "-m", "nvila_ft.cli", "finetune", *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads((out / "metrics.json").read_text())
    summary["wall_s"] = time.perf_counter() - start
    return summary


def row(method: str, summary: dict) -> str:
    objective = "accuracy"
    metrics = summary["metrics"]
    before = metrics.get("before_training", {}).get(objective)
    after = metrics.get("after_training", {}).get(objective)
    trainable = summary["trainable_parameters"]
    step_s = (summary["train_runtime_s"] or 0.0) / max(summary["steps"], 1)
    shown = lambda value: "-" if value is None else f"{value:.3f}"  # noqa: E731
    return (f"| {method} | {shown(before)} | {shown(after)} | {summary['train_loss']:.4f} | {trainable['llm']:,} "
            f"| {sum(trainable.values()):,} | {step_s:.3f} | {summary['wall_s']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the demo's)")
    parser.add_argument("--records", type=int, default=None, help="task.train.num_records (default: the demo's)")
    parser.add_argument("--eval-records", type=int, default=None, help="eval.max_records (default: every held-out record)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, given to every run")
    parser.add_argument("--workdir", default=None, help="where the run directories go (default: a temporary folder)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nvila-ft-methods-"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# demo task, {device}, torch {torch.__version__}; runs in {workdir}; overrides: {' '.join(args.extra) or 'none'}")
    print("| method | held-out accuracy before | after | train loss | trainable LLM | trainable all | step (s) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        summary = finetune(METHODS[method], workdir / method, args.steps, args.records, args.eval_records, args.extra)
        print(row(method, summary), flush=True)


if __name__ == "__main__":
    main()
