"""Does adapting the pretrained tiny NVILA work, and is it the pretraining that makes it work?

Each adapter preset fine-tunes, side by side with the same settings and seed, the pretrained tiny model and the
same architecture with random weights on `demo_scan` (synthetic scans, not in the pretraining mixture), and
reports held-out accuracy against the image-blind question prior, and the wall time of each run.

    .venv/bin/python bench/pretrained_transfer.py                       # nvila-8b-tiny, three presets
    .venv/bin/python bench/pretrained_transfer.py --model nvila_lite_tiny --presets ln_vit_lora_llm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def finetune(model: str, preset: str, steps: int, out: Path) -> dict:
    command = [sys.executable, "-m", "nvila_ft.cli", "finetune", f"model={model}", f"adapters={preset}",
               "task=demo_scan", f"trainer.max_steps={steps}", "trainer.save_steps=100000", "trainer.eval_steps=null",
               f"hydra.run.dir={out}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "before": metrics["metrics"]["before_training"]["accuracy"],
        "after": metrics["metrics"]["after_training"]["accuracy"],
        "prior": metrics["image_blind_baselines"]["question_prior"]["accuracy"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nvila_8b_tiny", help="a pretrained tiny model option (conf/model)")
    parser.add_argument("--presets", nargs="+", default=["ln_vit_lora_llm", "lora_vit_lora_llm", "ln_vit_qlora_llm"])
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    print("| preset | weights | held-out accuracy before -> after | question prior | wall time (s) |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for preset in args.presets:
            for weights, model in (("pretrained", args.model), ("random", f"{args.model}_random")):
                result = finetune(model, preset, args.steps, Path(scratch) / f"{preset}-{weights}")
                print(f"| {preset} | {weights} | {result['before']:.3f} -> {result['after']:.3f} | {result['prior']:.3f} "
                      f"| {result['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
