"""Does training on the DeltaLoss-pruned half beat training on a random half of the same size?

    PYTHONPATH=. OMP_NUM_THREADS=1 nice python bench/prune_vs_random.py [--label-noise 0.3] [--by file_type_answer] [--seeds 0 1 2]

1. A built-in dataset (default: `scan`, not part of the tiny model's pretraining) is generated and split into
   train.json and a fixed held-out val.json (LLaVA JSON, one media folder). With --label-noise f, a share f of the
   training records gets a wrong answer (another answer of its question type); val.json stays clean.
2. strong: `nvila-ft finetune` on all of train.json for --strong-steps (weak: the base model, nvila_8b_tiny).
3. `nvila-ft prune` keeps --keep-fraction of train.json; a random subset of the same size is drawn per seed.
4. For each seed, `nvila-ft finetune` on the pruned file and on that seed's random file (same steps, same seed),
   both evaluated on val.json; a table of held-out accuracy (and per question type) is printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nvila_ft.domains.registry import GENERATORS


def cli(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([sys.executable, "-m", "nvila_ft.cli", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"nvila-ft {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def finetune(run: Path, train: Path, val: Path, steps: int, seed: int, env: dict[str, str], extra: list[str]) -> dict:
    cli(["finetune", "task=vqa", f"task.train.path={train}", f"task.train.media_root={val.parent}",
         f"task.validation={val}", "task.max_new_tokens=4", "task.metrics=[accuracy,exact_match]", "task.objective=accuracy",
         f"trainer.max_steps={steps}", "trainer.eval_steps=100000", "trainer.save_steps=100000",
         "eval.before_training=false", f"seed={seed}", f"hydra.run.dir={run}", *extra], env)
    metrics = json.loads((run / "metrics.json").read_text())
    by_type = metrics.get("metrics_by_question_type", {}).get("after_training", {})
    return {"accuracy": metrics["metrics"]["after_training"]["accuracy"],
            "by_type": {k: round(v["accuracy"], 3) for k, v in by_type.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="scan", choices=sorted(GENERATORS))
    parser.add_argument("--records", type=int, default=800, help="generated records (train + held out)")
    parser.add_argument("--val", type=int, default=200, help="held-out records")
    parser.add_argument("--strong-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300, help="steps of each run on a half")
    parser.add_argument("--keep-fraction", type=float, default=0.5)
    parser.add_argument("--by", default="file_type_answer", help="prune.by")
    parser.add_argument("--label-noise", type=float, default=0.0, help="share of training answers made wrong")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--out", default="bench/results/prune_vs_random.json")
    parser.add_argument("overrides", nargs="*", help="extra nvila-ft overrides for every finetune (e.g. model=...)")
    args = parser.parse_args()
    started = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="prune-vs-random-"))
    env = dict(os.environ, NVILA_FT_CACHE=str(work / "cache"), HF_HUB_OFFLINE="1", WANDB_MODE="offline")

    data_file = GENERATORS[args.dataset].make(work / "data", args.records, seed=1234)
    entries = json.loads(data_file.read_text())
    answers = json.loads((data_file.parent / "answers.json").read_text())
    order = list(range(len(entries)))
    random.Random(1234).shuffle(order)
    held = set(order[: args.val])
    train_file, val_file = data_file.parent / "train.json", data_file.parent / "val.json"
    train = [e for i, e in enumerate(entries) if i not in held]
    noisy = set(random.Random(99).sample(range(len(train)), round(args.label_noise * len(train))))
    for i in noisy:
        answer = train[i]["conversations"][1]["value"]
        train[i]["conversations"][1]["value"] = random.Random(i).choice(
            [a for a in answers[train[i]["question_type"]] if a != answer])
    train_file.write_text(json.dumps(train))
    val_file.write_text(json.dumps([e for i, e in enumerate(entries) if i in held]))

    strong = work / "strong"
    strong_scores = finetune(strong, train_file, val_file, args.strong_steps, 0, env, args.overrides)
    print(f"strong ({args.strong_steps} steps on {len(train)} records): held-out accuracy {strong_scores['accuracy']:.3f}", flush=True)
    cli(["prune", "task=vqa", f"task.train.path={train_file}", f"task.validation={val_file}",
         f"prune.strong={strong}", "prune.weak=base", f"prune.keep_fraction={args.keep_fraction}", f"prune.by={args.by}",
         f"hydra.run.dir={work / 'prune'}", *[o for o in args.overrides if o.startswith(("model", "precision"))]], env)
    pruned_file = work / "prune" / "pruned" / "train.json"
    kept = len(json.loads(pruned_file.read_text()))
    report = json.loads((work / "prune" / "prune_report.json").read_text())
    kept_noisy = sum(int(r["origin"].rpartition("[")[2][:-1]) in noisy for r in map(json.loads, (work / "prune" / "scores.jsonl").open())
                     if r["decision"] == "kept")
    print(f"pruned: kept {kept} of {len(train)} ({report['by_reason']}); wrong answers kept {kept_noisy} of {len(noisy)}", flush=True)

    rows = []
    for seed in args.seeds:
        random_file = data_file.parent / f"random-{seed}.json"
        chosen = sorted(random.Random(seed).sample(range(len(train)), kept))
        random_file.write_text(json.dumps([train[i] for i in chosen]))
        row = {"seed": seed}
        for name, file in (("pruned", pruned_file), ("random", random_file)):
            row[name] = finetune(work / f"{name}-{seed}", file, val_file, args.steps, seed, env, args.overrides)
        rows.append(row)
        print(f"seed {seed}: pruned {row['pruned']['accuracy']:.3f} {row['pruned']['by_type']}   "
              f"random {row['random']['accuracy']:.3f} {row['random']['by_type']}", flush=True)

    mean = {k: sum(r[k]["accuracy"] for r in rows) / len(rows) for k in ("pruned", "random")}
    wall = time.time() - started
    print(f"\n{args.dataset}: {len(train)} train ({len(noisy)} wrong answers) / {args.val} held-out records, keep {kept}, "
          f"{args.steps} steps per run (strong: {args.strong_steps})")
    print("| seed | pruned (DeltaLoss) | random half |\n|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['pruned']['accuracy']:.3f} | {r['random']['accuracy']:.3f} |")
    print(f"| mean | {mean['pruned']:.3f} | {mean['random']:.3f} |")
    print(f"wall time {wall:.0f} s; work folder {work}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "train": len(train), "kept": kept, "by_reason": report["by_reason"],
                               "wrong_answers": len(noisy), "wrong_answers_kept": kept_noisy,
                               "strong": strong_scores, "runs": rows, "mean": mean, "wall_s": round(wall)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
