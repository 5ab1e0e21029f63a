"""BENCHMARKS.md's table of the real-size runs (bench/real_dims.py JSON lines): the newest row of each preset, setting,
policy and mode, with the speed ratio to the baseline of the same preset, setting and policy.

    .venv/bin/python bench/real_size_table.py bench/results/cpu_nvila_8b.jsonl bench/results/cpu_nvila_15b.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GB = 1e9
TARGETS_GB = {("nvila-8b", "ln_vit_qlora_llm"): 6.0, ("nvila-8b", "ln_vit_lora_llm"): 16.5, ("nvila-8b", "ln_vit_fp8_lora_llm"): 10.0,
              ("nvila-15b", "ln_vit_qlora_llm"): 11.0}  # issue 17, with every lever
MODES = ("levers", "nvila-ft", "none", "baseline")


def newest_rows(paths: list[Path]) -> dict[tuple, dict]:
    """The newest complete row of each run; a run that never completed keeps its last error line."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "mode" not in row:
                continue
            mode = row["mode"] + (", NF4 lm_head" if row.get("lm_head_bits") == 4 else "")
            key = (row["preset"], row["setting"], row["policy"], mode)
            if (row.get("step_seconds") or 0) > 1e6:
                row["step_seconds"] = None  # the bench's first version overwrote it with a timeline time
            if "peak_tensor_bytes" in row or "peak_tensor_bytes" not in rows.get(key, {}):
                rows[key] = row
    return rows


def gb(value) -> str:
    return f"{value / GB:.2f}" if value else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args()
    rows = newest_rows(args.results)
    print("| model | setting | policy | way | positions | peak tensor GB (target) | fwd+bwd peak GB | planned GB (error) | "
          "planned on a GPU GB | peak RSS / anonymous GB | load s, anonymous GB | step s (speed vs baseline) | losses |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = sorted(rows, key=lambda k: (k[0], k[1], k[2], MODES.index(k[3].split(",")[0]) if k[3].split(",")[0] in MODES else 9, k[3]))
    for key in order:
        row = rows[key]
        preset, setting, policy, mode = key
        if "peak_tensor_bytes" not in row:
            print(f"| {preset} | {setting} | `{policy}` | {mode} | - | did not finish: {' '.join(row.get('error') or [])[:120]} (exit {row.get('returncode')}) |"
                  " - | - | - | - | - | - | - |")
            continue
        target = TARGETS_GB.get((preset, policy)) if mode.startswith("levers") and setting == "paper" else None  # the targets are at the paper's sample
        peak = gb(row["peak_tensor_bytes"]) + (f" ({target:.1f}: {'met' if row['peak_tensor_bytes'] <= target * GB else 'missed'})" if target else "")
        planned = f"{gb(row['planned_bytes'])} ({row['plan_error_percent']:+.1f}%)" if row.get("planned_bytes") else "-"
        baseline = rows.get((preset, setting, policy, "baseline"), {})
        speed = row.get("step_seconds")
        ratio = f" ({baseline['step_seconds'] / speed:.2f}x)" if speed and baseline.get("step_seconds") and mode != "baseline" else ""
        losses = ", ".join(f"{v:.3f}" for v in row.get("losses", []))
        print(f"| {preset} | {setting} | `{policy}` | {mode} | {row['positions']} | {peak} | {gb(row.get('peak_before_optimizer_bytes'))} | {planned} | "
              f"{gb(row.get('planned_gpu_allocated_bytes'))} | {gb(row['peak_rss_bytes'])} / {gb(row.get('peak_anonymous_bytes'))} | "
              f"{row.get('load_seconds', '-')}, {gb(row.get('load_peak_anonymous_bytes'))} | {speed if speed else '-'}{ratio} | {losses} |")


if __name__ == "__main__":
    main()
