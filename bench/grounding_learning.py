"""Does the pretrained tiny NVILA learn referring-expression grounding on a CPU, and by how much over chance?

Fine-tunes `task=grounding` (the built-in synthetic set: two or three coloured shapes in the cells of a 3x3
layout, "the red circle" -> "[x1, y1, x2, y2]") with the CLI, one run per (adapter override, steps), and reports
the held-out Acc@0.5, mean IoU and malformed-answer rate before and after, beside the image-blind baselines
(the mean training box, the most common training box), and the wall time of each run. A model that finds
shapes but ignores the expression would hit about 1 in 2.5 (the mean number of shapes), so the table also
splits the held-out predictions into "on the named shape" / "on another shape" (IoU >= 0.5 with that shape's
box, read from the image's pixels).

    .venv/bin/python bench/grounding_learning.py                               # full LLM, 1500 steps
    .venv/bin/python bench/grounding_learning.py --steps 500 1500 --overrides "adapters.llm.method=full" ""
    .venv/bin/python bench/grounding_learning.py --extra task.train.synthetic.grid=2

The `""` override is the default policy (ln_vit_lora_llm): the tiny LLM never had to write a digit in its
pretraining and gives digits almost no probability, which LoRA on its layers does not lift (the loss stays near
uniform); real NVILA checkpoints write numbers and need no such change.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nvila_ft.domains.grounding.boxes import iou, parse_box
from nvila_ft.domains.synthetic import COLORS


def shape_hits(predictions: Path) -> tuple[int, int, int]:
    """(on the named shape, on another shape, on none) of the held-out predictions of a built-in-data run."""
    named = other = 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    for row in rows:
        data_file, index = re.fullmatch(r"(.*)\[(\d+)\]", row["origin"]).groups()
        record = json.loads(Path(data_file).read_text())[int(index)]
        pixels = np.asarray(Image.open(Path(data_file).parent / record["image"]).convert("RGB"))
        height, width = pixels.shape[:2]
        box = parse_box(row["prediction"]).box
        target = row["question"].rsplit("the ", 1)[1].split()[0]
        for color, rgb in COLORS.items():
            ys, xs = np.nonzero(np.all(pixels == rgb, axis=-1))
            if box is None or not len(xs):
                continue
            shape = (xs.min() / width, ys.min() / height, (xs.max() + 1) / width, (ys.max() + 1) / height)
            if iou(box, shape) >= 0.5:
                named += color == target
                other += color != target
                break
    return named, other, len(rows) - named - other


def finetune(overrides: list[str], steps: int, out: Path, eval_records: int) -> dict:
    command = [sys.executable, "-m", "nvila_ft.cli", "finetune", "task=grounding", f"trainer.max_steps={steps}",
               "trainer.save_steps=100000", "trainer.eval_steps=null", f"eval.max_records={eval_records}",
               f"hydra.run.dir={out}", *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    return {"metrics": metrics["metrics"], "baselines": metrics["image_blind_baselines"], "seconds": seconds,
            "steps": metrics["steps"], "hits": shape_hits(out / "predictions_after_training.jsonl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1500])
    parser.add_argument("--overrides", nargs="+", default=["adapters.llm.method=full"],
                        help="one run per entry; each entry is space-separated overrides ('' = defaults)")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    parser.add_argument("--eval-records", type=int, default=300)
    args = parser.parse_args()
    print("| overrides | steps | Acc@0.5 before -> after | mean IoU before -> after | malformed after "
          "| on named / other / no shape | mean box Acc@0.5 / IoU | most common box Acc@0.5 | wall time (s) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for k, overrides in enumerate(args.overrides):
            for steps in args.steps:
                r = finetune(overrides.split() + args.extra, steps, Path(scratch) / f"run{k}-{steps}", args.eval_records)
                before, after = r["metrics"].get("before_training", {}), r["metrics"]["after_training"]
                mean, common = r["baselines"].get("mean_box", {}), r["baselines"]["majority_answer"]
                print(f"| {overrides or '(defaults)'} | {r['steps']} | {before.get('iou_accuracy', float('nan')):.3f} -> "
                      f"{after['iou_accuracy']:.3f} | {before.get('mean_iou', float('nan')):.3f} -> {after['mean_iou']:.3f} "
                      f"| {after['malformed_box_rate']:.3f} | {' / '.join(map(str, r['hits']))} | {mean.get('iou_accuracy', float('nan')):.3f} / "
                      f"{mean.get('mean_iou', float('nan')):.3f} | {common['iou_accuracy']:.3f} | {r['seconds']:.0f} |",
                      flush=True)
    print(f"\nheld-out records scored: eval.max_records={args.eval_records}; extra overrides: {' '.join(args.extra) or 'none'}")


if __name__ == "__main__":
    main()
