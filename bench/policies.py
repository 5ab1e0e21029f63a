"""Trainable parameters, peak memory and step time of every adapter preset in adapters/.

    # tiny presets on CPU (each preset in its own subprocess, peak RSS)
    .venv/bin/python bench/policies.py --model nvila-8b-tiny
    # released dimensions with random weights, on a GPU (peak CUDA memory); checkpoints are written to --workdir once
    python bench/policies.py --model nvila-8b --workdir /tmp/nvila-bench --steps 10
    python bench/policies.py --model nvila-lite-2b --workdir /tmp/nvila-bench --steps 10

One step = forward + backward + AdamW step on one sample: one 448x448 image (Dynamic-S2: 14 tiles, 2305 image
positions for NVILA-8B) and a text of about 300 tokens, as in the paper's PEFT study (Table 5). Gradient
checkpointing is off unless --gradient-checkpointing.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sample(size: int) -> list[dict]:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, size // 2, size // 2), fill="red")
    question = "Describe the picture in detail. " * 50  # about 300 text tokens with the real Qwen2 vocabulary
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": "A red circle on a white background, in the upper left part of the image."},
    ]


def measure(model_name: str, preset_file: str, workdir: Path, steps: int, checkpointing: bool, dtype_name: str) -> dict:
    from nvila_ft.adapters import AdapterPolicy, apply_policy, load_for_policy, trainable_report
    from nvila_ft.adapters.optim import build_optimizer
    from nvila_ft.data.processor import NVILAProcessor

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, dtype_name)
    checkpoint = workdir / model_name
    if not (checkpoint / "config.json").is_file():
        from nvila_ft.model.presets import build_model

        build_model(model_name, dtype=dtype).save_pretrained(checkpoint)
    policy = AdapterPolicy.from_yaml(preset_file)
    if policy.llm.method == "qlora":
        policy.llm.quantization.compute_dtype = dtype_name
    model = apply_policy(load_for_policy(checkpoint, policy, dtype=dtype, device=device), policy)
    for param in model.parameters():  # trainable tensors in float32, as nvila-ft's precision settings do
        if param.requires_grad:
            param.data = param.data.float()
    if checkpointing:
        model.gradient_checkpointing_enable()
    processor = NVILAProcessor.from_pretrained(checkpoint)
    batch = {k: v.to(device) for k, v in processor([sample(model.config.tile_size)]).items()}
    optimizer = build_optimizer(model, policy, 1e-5)
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:  # the first step warms up kernels and allocators
            times.append(time.perf_counter() - start)
    rows = {r.component: r.trainable for r in trainable_report(model, policy)}
    return {
        "preset": Path(preset_file).stem,
        "trainable": rows,
        "step_s": statistics.median(times),
        "peak_gib": (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "memory": "CUDA max allocated" if cuda else "process peak RSS",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="nvila-8b-tiny")
    parser.add_argument("--workdir", default="/tmp/nvila-ft-bench")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--presets", nargs="*", default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(measure(args.model, args.one, workdir, args.steps, args.gradient_checkpointing, dtype)))
        return
    files = sorted(p for p in (ROOT / "adapters").glob("*.yaml") if p.stem != "none")
    if args.presets:
        files = [f for f in files if f.stem in args.presets]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"# {args.model}, {dtype}, {device}, torch {torch.__version__}, GC {'on' if args.gradient_checkpointing else 'off'}")
    print("| preset | trainable vision / projector / LLM | step (s) | peak memory (GiB) |")
    print("|---|---|---|---|")
    for file in files:
        command = [sys.executable, __file__, "--model", args.model, "--workdir", str(workdir), "--steps", str(args.steps),
                   "--dtype", dtype, "--one", str(file)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {file.stem} | failed: {done.stderr.strip().splitlines()[-1][:120]} | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        t = r["trainable"]
        print(f"| {r['preset']} | {t['vision_tower']:,} / {t['mm_projector']:,} / {t['llm']:,} | {r['step_s']:.3f} | {r['peak_gib']:.2f} ({r['memory']}) |", flush=True)


if __name__ == "__main__":
    main()
