"""Training step time of the tiny NVILA on the CPU at several torch thread counts, side by side in one process.

torch sizes its thread pool by the CPUs the host shows; in a container limited to fewer CPUs, or on a machine
that is busy, that oversubscribes the cores. nvila-ft's default (`cpu_threads=null`) is the CPUs this process
may use (`nvila_ft.training.cpu_threads.usable_cpus`).

    .venv/bin/python bench/cpu_threads.py                      # idle machine
    .venv/bin/python bench/cpu_threads.py --busy               # with one busy-looping process beside it
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time

import torch
from PIL import Image

from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.presets import save_preset_checkpoint
from nvila_ft.training.cpu_threads import usable_cpus


def _spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--busy", action="store_true", help="run one CPU-bound process beside the measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = save_preset_checkpoint(f"{scratch}/tiny", "nvila-8b-tiny")
        model = NVILAForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        processor = NVILAProcessor.from_pretrained(checkpoint)
    sample = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64), "red")},
                                           {"type": "text", "text": "What color is the shape?"}]},
              {"role": "assistant", "content": "red"}]
    batch = processor([sample] * 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    spinner = multiprocessing.Process(target=_spin, daemon=True) if args.busy else None
    if spinner:
        spinner.start()
    print(f"usable CPUs: {usable_cpus()}; busy neighbour: {args.busy}\n| threads | step ms (median of {args.steps}) |\n|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = []
        for step in range(args.steps + 3):
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 3:
                times.append(time.perf_counter() - start)
        print(f"| {threads} | {1000 * statistics.median(times):.0f} |", flush=True)
    if spinner:
        spinner.terminate()


if __name__ == "__main__":
    main()
