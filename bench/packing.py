"""Packed rows vs padded batches on a realistic mix, side by side in one process.

The mix: VQA samples with images of varied sizes (from a single tile to a 3x4 Dynamic-S2 grid), some 8-frame
videos and some text-only turns, at `nvila-8b-small` width (random weights). Both modes train on the same
samples for one pass (forward + backward + AdamW): padded batches of `--batch` samples, and micro-batches of
`--rows` packed rows of up to `--max-tokens` positions (first-fit decreasing). Reported: padding share, steps,
median step time, real (non-padding) positions per second, and the time ratio.

    .venv/bin/python bench/packing.py                    # CPU
    python bench/packing.py --device cuda --samples 256  # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from nvila_ft.data.dataset import Collator
from nvila_ft.data.packing import PackedBatchSampler
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.presets import build_model


def mix(count: int, seed: int = 0) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        kind = rng.choice(["image", "image", "image", "video", "text"])
        answer = " ".join(["word"] * int(rng.integers(2, 30)))
        if kind == "text":
            out.append([{"role": "user", "content": "A question without media? " * int(rng.integers(1, 6))},
                        {"role": "assistant", "content": answer}])
            continue
        if kind == "image":
            width, height = (int(v) for v in rng.integers(48, 320, 2))
            media = {"type": "image", "image": Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))}
        else:
            frames = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(8)]
            media = {"type": "video", "video": frames}
        out.append([{"role": "user", "content": [media, {"type": "text", "text": f"Question {index}?"}]},
                    {"role": "assistant", "content": answer}])
    return out


def run(model, batches: list[dict], device: str) -> dict:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times, real = [], 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items() if k != "num_positions"}
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    return {"steps": len(batches), "median_step_s": statistics.median(times), "seconds": sum(times),
            "real_positions_per_s": real / sum(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="packed row budget (default: twice the longest sample)")
    parser.add_argument("--rows", type=int, default=2, help="packed rows per micro-batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("nvila-8b-small", seed=0).to(args.device).train()
    processor = NVILAProcessor(model.tokenizer, model.config)
    samples = [processor.process(c) for c in mix(args.samples)]
    lengths = [s.length for s in samples]

    padded_batches = [Collator(processor)(samples[k : k + args.batch]) for k in range(0, len(samples), args.batch)]
    slots = sum(b["input_ids"].numel() for b in padded_batches)
    budget = args.max_tokens or 2 * max(lengths)
    sampler = PackedBatchSampler(lengths, budget, rows=args.rows, seed=0)
    packed_batches = [Collator(processor, max_tokens=budget)([samples[i] for i in batch]) for batch in sampler]

    run(model, padded_batches[:2], args.device)  # warm-up
    padded = run(model, padded_batches, args.device)
    packed = run(model, packed_batches, args.device)
    result = {
        "samples": len(samples), "mean_length": float(np.mean(lengths)), "max_length": max(lengths),
        "padded": padded | {"padding_share": 1 - sum(lengths) / slots},
        "packed": packed | {"max_tokens": budget, "rows": args.rows,
                            "padding_share": 1 - sum(lengths) / sum(b["input_ids"].numel() for b in packed_batches)},
        "speedup": padded["seconds"] / packed["seconds"], "device": args.device, "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
