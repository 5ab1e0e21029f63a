"""The planner's estimate beside the measured peak of real training steps, one JSON line per run.

Measured: on a GPU `torch.cuda.max_memory_allocated` over a training step (after one warm-up step, so optimizer
states exist); on the CPU the peak of the tensor bytes in the profiler's memory timeline over the same step (a
measure that counts tensors, not process memory). Random weights, no download.

    .venv/bin/python bench/plan_vs_measured.py --preset nvila-8b-small --policy ln_vit_lora_llm --image 128x128 --text 200
    .venv/bin/python bench/plan_vs_measured.py --preset nvila-lite-2b --precision bf16 --policy ln_vit_lora_llm   # 10 GB RAM
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy
from nvila_ft.adapters.optim import build_optimizer
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.presets import build_model, save_preset_checkpoint
from nvila_ft.training.peak import peak_bytes
from nvila_ft.training.planner import RunShape, SampleDemand, plan

ROOT = Path(__file__).resolve().parents[1]


def conversation(width: int, height: int, text_tokens: int) -> list[dict]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    question = "word " * text_tokens  # one token a word with the tiny tokenizer's pre-tokenizer
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": "An answer of a few words, for the loss."}]


def build(preset: str, policy: AdapterPolicy, dtype: torch.dtype, device: str, workdir: Path):
    if any(getattr(policy, c).method == "qlora" for c in ("llm", "vision_tower")):
        checkpoint = workdir / preset
        if not (checkpoint / "config.json").is_file():
            save_preset_checkpoint(checkpoint, preset)
        model = load_for_policy(checkpoint, policy, dtype, device)
    else:
        model = build_model(preset, dtype=dtype).to(device)
    return apply_policy(model, policy)


def measure(model, batch: dict, optimizer, device: str, autocast: torch.dtype | None) -> int:
    """Peak tensor bytes of one training step, after a first step has created the optimizer states."""
    def step():
        with torch.autocast(device_type=device, dtype=autocast, enabled=autocast is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    step()
    return peak_bytes(step, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nvila-8b-small")
    parser.add_argument("--policy", default="ln_vit_lora_llm")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--image", default="128x128", help="W x H of the one image")
    parser.add_argument("--text", type=int, default=200, help="question words")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nvila-plan-bench")
    args = parser.parse_args()
    policy = AdapterPolicy.from_yaml(str(ROOT / "adapters" / f"{args.policy}.yaml"))
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    autocast = None if args.precision == "fp32" else torch.bfloat16
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = build(args.preset, policy, dtype, args.device, args.workdir)
    if dtype != torch.float32:  # trainable tensors in float32, as nvila-ft keeps them
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    processor = NVILAProcessor(model.tokenizer, model.config)
    width, height = (int(v) for v in args.image.split("x"))
    chat = conversation(width, height, args.text)
    size = processor.measure(chat)
    batch = {k: v.to(args.device) for k, v in processor(chat).items()}
    optimizer = build_optimizer(model, policy, 1e-4)
    start = time.perf_counter()
    measured = measure(model, batch, optimizer, args.device, autocast)
    estimate = plan(model.config, policy, SampleDemand(size.positions, size.tiles, size.supervised),
                    RunShape(weights_dtype=dtype, cuda=args.device == "cuda"))
    print(json.dumps({
        "preset": args.preset, "policy": args.policy, "precision": args.precision, "device": args.device,
        "positions": size.positions, "tiles": size.tiles, "measured_bytes": measured, "planned_bytes": estimate.total,
        "error_percent": round(100 * (estimate.total - measured) / measured, 1),
        "planned": {k: v for k, v in estimate.by_item().items()}, "seconds": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
