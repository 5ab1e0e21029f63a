"""Re-plans the measured nvila-ft rows of a `bench/real_dims.py` JSONL with the current planner (no weights, no step).

When the planner changes, the measured peaks stay what they were; this prints, per row, the measured peak, the
plan the row was written with and the plan now, each with its error:

    .venv/bin/python bench/replan.py bench/results/cpu_nvila_lite_2b.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from real_dims import SETTINGS, load_policy


def main() -> None:
    from nvila_ft.model.presets import preset_config
    from nvila_ft.training.planner import RunShape, SampleDemand, plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--supervised", type=int, default=11, help="supervised positions of the bench's answer")
    args = parser.parse_args()
    newest = {}
    for line in args.results.read_text().splitlines():
        row = json.loads(line)
        if row.get("mode") in ("nvila-ft", "levers", "none") and "peak_tensor_bytes" in row:  # the newest row of each run wins
            newest[(row["preset"], row["setting"], row["policy"], row.get("fp8_compute"), row.get("levers", False), row.get("lm_head_bits"), row["mode"])] = row
    print(f"{'preset':14} {'setting':9} {'policy':22} {'measured GB':>11} {'planned then':>15} {'planned now':>15}")
    for (preset, setting, policy_name, _fp8, levers, _head, _mode), row in newest.items():
        dtype = torch.bfloat16 if row["precision"] == "bf16" else torch.float32
        checkpointing = tuple(row.get("checkpointing", SETTINGS[setting][3]))
        # rows of the first versions of the bench lack the newer fields: their defaults are what those runs did
        shape = RunShape(weights_dtype=dtype, checkpointing=checkpointing, selective_loss=row.get("selective_loss", True),
                         cuda=row["device"] == "cuda", optim=row.get("optim", "adamw_torch"),
                         trainable_float32=row.get("trainable_float32", not levers), offload_embeddings=row.get("offload_embeddings", False),
                         lm_head_bits=row.get("lm_head_bits", 16), vision_tower_bits=row.get("vision_tower_bits", 16))
        supervised = row.get("supervised", args.supervised)
        planned = plan(preset_config(preset, dtype), load_policy(policy_name), SampleDemand(row["positions"], row["tiles"], supervised), shape).allocated
        measured = row["peak_tensor_bytes"]
        then = f"{row['planned_bytes'] / 1e9:.2f} ({row['plan_error_percent']:+.1f}%)"
        now = f"{planned / 1e9:.2f} ({100 * (planned - measured) / measured:+.1f}%)"
        print(f"{preset:14} {setting:9} {policy_name:22} {measured / 1e9:11.2f} {then:>15} {now:>15}")


if __name__ == "__main__":
    main()
