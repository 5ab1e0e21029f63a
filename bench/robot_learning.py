"""Does the tiny NVILA-Video learn the built-in robot episodes (task=robot_episodes) on a CPU?

Fine-tunes `model` (default the pretrained tiny NVILA-Video, 16 frames, temporal pooling [[8,1,1]]) on the built-in
pick-up episodes through the CLI and scores held-out episodes drawn with another seed (so no validation step shares
an episode with training) before and after: action exact match, per-field accuracy and the malformed-output rate,
beside the image-blind majority-answer baseline nvila-ft computes.

    .venv/bin/python bench/robot_learning.py                      # 2000 steps, batch 16, full fine-tuning
    .venv/bin/python bench/robot_learning.py --steps 500 --adapters ln_vit_lora_llm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nvila_ft.domains.robotics.generators import make_robot_episodes_dataset

FIELDS = ("x", "y", "grip")


def row(name: str, scores: dict) -> str:
    fields = " / ".join(f"{scores[f'action_field_accuracy/{f}']:.3f}" for f in FIELDS)
    return (f"| {name} | {scores['action_exact_match']:.3f} | {fields} | {scores['action_field_accuracy']:.3f} "
            f"| {scores['action_malformed_rate']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nvila_video_tiny")
    parser.add_argument("--adapters", default="ft_vit_ft_llm")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=400, help="training episodes (built-in, seed 0)")
    parser.add_argument("--val-episodes", type=int, default=80, help="held-out episodes (seed 1)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        validation = make_robot_episodes_dataset(Path(scratch) / "val", num_episodes=args.val_episodes, seed=1)
        run = Path(scratch) / "run"
        command = [sys.executable, "-m", "nvila_ft.cli", "finetune", f"model={args.model}", "task=robot_episodes",
                   f"adapters={args.adapters}", f"task.train.builtin.num_episodes={args.episodes}",
                   f"task.validation={validation}", f"trainer.max_steps={args.steps}",
                   f"trainer.per_device_train_batch_size={args.batch}", "trainer.save_steps=100000",
                   "trainer.eval_steps=null", f"cpu_threads={args.threads}", f"hydra.run.dir={run}"]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        metrics = json.loads((run / "metrics.json").read_text())
    print(f"{args.model}, adapters={args.adapters}, {args.steps} steps of batch {args.batch}, "
          f"{metrics['train_records']} training steps-records, {metrics['validation_records']} held-out; "
          f"wall time {seconds:.0f} s (training {metrics['train_runtime_s']:.0f} s)")
    print("| | action exact match | field accuracy x / y / grip | mean field accuracy | malformed |\n|---|---|---|---|---|")
    print(row("before fine-tuning", metrics["metrics"]["before_training"]))
    print(row("after fine-tuning", metrics["metrics"]["after_training"]))
    print(row("image-blind majority answer", metrics["image_blind_baselines"]["majority_answer"]))


if __name__ == "__main__":
    main()
