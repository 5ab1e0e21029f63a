"""The pretrained tiny NVILAs shipped with nvila-ft, and the recipe that rebuilds them.

A random tiny model cannot show what nvila-ft is for: starting from a pretrained NVILA and adapting it with
LayerNorm / LoRA / QLoRA policies. So each tiny preset also ships pretrained, in the official checkpoint layout,
under `assets/pretrained/<preset>/` (1.3-1.8 MB each, float32). They are made with nvila-ft itself: the randomly
initialised preset is fully fine-tuned (`ft_vit_ft_llm`) on the built-in `pretrain_tiny` mixture (single shapes;
scenes of one to three shapes asked about count, presence, colour, shape, place, or described; moving blocks
asked about direction and colour), then exported merged. `demo_scan` (synthetic scans: is there a lesion, on
which side) is deliberately left out of the mixture, so that adapting to it shows transfer.

    python -m nvila_ft.model.pretrained                  # rebuild all three (CPU; see RECIPE for the settings)
    python -m nvila_ft.model.pretrained nvila-lite-tiny  # one of them

The recipe is fixed by seeds and runs on one CPU thread, so a rebuild with the same versions of torch and
transformers gives the same weights (about 15 minutes per preset on one core). `pretraining.json` beside each
checkpoint records how it was made and what it reached on its held-out mixture.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nvila_ft.model.config import CheckpointError

PRETRAINED_DIR = Path(__file__).parent / "assets" / "pretrained"
RECORD_FILE = "pretraining.json"
PRETRAINED_PRESETS = ("nvila-8b-tiny", "nvila-lite-tiny", "nvila-video-tiny")

# `nvila-ft finetune` overrides of the pretraining run (the model option is added per preset).
RECIPE = (
    "task=pretrain_tiny",
    "adapters=ft_vit_ft_llm",
    "trainer=default",
    "trainer.max_steps=8000",
    "trainer.per_device_train_batch_size=16",
    "trainer.learning_rate=1e-3",
    "trainer.warmup_ratio=0.02",
    "trainer.eval_steps=2000",
    "trainer.save_steps=2000",
    "trainer.save_total_limit=1",
    "trainer.load_best_model_at_end=false",
    "eval.before_training=false",
    "eval.max_records=400",
    "precision=fp32",
    "seed=0",
    "cpu_threads=1",  # one thread: the same arithmetic on any machine
)


def pretrained_checkpoint(preset: str) -> Path:
    """The shipped pretrained checkpoint of a tiny preset."""
    folder = PRETRAINED_DIR / preset
    if not (folder / "config.json").is_file():
        shipped = ", ".join(p for p in PRETRAINED_PRESETS if (PRETRAINED_DIR / p / "config.json").is_file()) or "none"
        raise CheckpointError(
            f"no pretrained weights are shipped for preset {preset!r} (shipped: {shipped}); "
            "rebuild them with `python -m nvila_ft.model.pretrained`, or set model.pretrained=false"
        )
    return folder


def _model_option(preset: str) -> str:
    return "model=" + preset.removesuffix("-tiny").replace("-", "_") + "_tiny_random"


def rebuild(preset: str, work_dir: Path, output: Path | None = None) -> Path:
    """Pretrain `preset` from its random initialisation with RECIPE and write it to `output` (the packaged folder
    by default). Runs `nvila-ft finetune` then `nvila-ft export` in subprocesses, as a user would."""
    if preset not in PRETRAINED_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r} (known: {', '.join(PRETRAINED_PRESETS)})")
    output = Path(output or PRETRAINED_DIR / preset)
    run = work_dir / f"pretrain-{preset}"
    overrides = [_model_option(preset), *RECIPE]
    command = [sys.executable, "-m", "nvila_ft.cli"]
    subprocess.run([*command, "finetune", *overrides, f"hydra.run.dir={run}"], check=True)
    subprocess.run(
        [*command, "export", f"run={run}", f"export.output={output}", "export.overwrite=true",
         f"hydra.run.dir={work_dir / f'export-{preset}'}"],
        check=True,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    record = {
        "preset": preset,
        "command": "nvila-ft finetune " + " ".join(overrides),
        "steps": metrics["steps"],
        "train_loss": metrics["train_loss"],
        "held_out_accuracy": metrics["metrics"].get("after_training", {}).get("accuracy"),
        "held_out_by_question_type": metrics.get("metrics_by_question_type", {}).get("after_training", {}),
        "torch": torch.__version__,
    }
    (output / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Rebuild the pretrained tiny NVILAs shipped with nvila-ft.")
    parser.add_argument("presets", nargs="*", default=list(PRETRAINED_PRESETS), help="default: all three")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the pretraining runs go (default: a temp dir)")
    parser.add_argument("--output-root", type=Path, default=PRETRAINED_DIR, help="default: the package's assets")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="nvila-ft-pretrain-") as scratch:
        work_dir = args.work_dir or Path(scratch)
        for preset in args.presets:
            print(f"{preset}: {rebuild(preset, work_dir, args.output_root / preset)}", flush=True)


if __name__ == "__main__":
    main()
