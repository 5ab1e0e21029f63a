"""Forward latency and peak memory of the tiny presets on CPU (one image or one video per sample).

    .venv/bin/python bench/cpu_forward.py [--repeats 20]

Each preset runs in a fresh subprocess so that its peak RSS is its own.
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

import torch


def measure(preset: str, repeats: int, batch_size: int) -> dict:
    from PIL import Image, ImageDraw

    from nvila_ft.data.processor import NVILAProcessor
    from nvila_ft.model.presets import build_model

    def frame(x: int, size: tuple[int, int]) -> Image.Image:
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).ellipse((x, 10, x + 30, 40), fill="red")
        return image

    model = build_model(preset)
    processor = NVILAProcessor(model.tokenizer, model.config)
    results = {}
    for kind, source in (("image", frame(20, (320, 240))), ("video", [frame(3 * t, (64, 48)) for t in range(16)])):
        conversation = [
            {"role": "user", "content": [{"type": kind, kind: source}, {"type": "text", "text": "What is shown?"}]},
            {"role": "assistant", "content": "A shape on a plain background."},
        ]
        batch = processor([conversation] * batch_size)
        with torch.no_grad():
            model(**batch)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                output = model(**batch)
                times.append(time.perf_counter() - start)
        results[kind] = {
            "positions": output.logits.shape[1],
            "median_ms": 1000 * statistics.median(times),
            "p90_ms": 1000 * sorted(times)[int(0.9 * (len(times) - 1))],
        }
    start = time.perf_counter()
    model.train()
    loss = model(**batch).loss
    loss.backward()
    results["train_step_ms_video"] = 1000 * (time.perf_counter() - start)
    results["params"] = sum(p.numel() for p in model.parameters())
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--preset")
    args = parser.parse_args()
    if args.preset:
        print(json.dumps(measure(args.preset, args.repeats, args.batch_size)))
        return
    from nvila_ft.model.presets import TINY_PRESETS

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| preset | params | image: positions / median ms / p90 ms | video: positions / median ms / p90 ms | fwd+bwd ms (video) | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for preset in TINY_PRESETS:
        out = subprocess.run(
            [sys.executable, __file__, "--preset", preset, "--repeats", str(args.repeats), "--batch-size", str(args.batch_size)],
            capture_output=True, text=True, check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        image, video = r["image"], r["video"]
        print(
            f"| {preset} | {r['params']:,} | {image['positions']} / {image['median_ms']:.1f} / {image['p90_ms']:.1f} "
            f"| {video['positions']} / {video['median_ms']:.1f} / {video['p90_ms']:.1f} | {r['train_step_ms_video']:.0f} "
            f"| {r['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
