"""README's per-GPU table: which adapter presets fit a card of each size, for NVILA-Lite-2B, NVILA-8B and NVILA-15B.

The sample is the medical setting of bench/real_dims.py (one 1024x768 image through the model's own tiling, a short
question and a two-sentence answer), bf16, micro-batch 1, with every memory lever the policy and model allow
(`real_dims.run_shape("levers", ...)`: selective loss, checkpointing of both components, 8-bit AdamW, 16-bit trained
tensors, the embedding table in host memory, lm_head and a frozen / LayerNorm-tuned vision tower in int8 rows). A
preset fits a card when the planner's total (tensors + CUDA context + 5% allocator slack) is at most the card's
memory in GiB. Each cell gives the planned GiB on the GPU and, where `--measured` holds a run of that model, setting and policy with
every lever, its measured tensor peak (CPU profiler, or the GPU's `max_memory_allocated`); "planned" alone otherwise.

    .venv/bin/python bench/per_gpu_table.py --measured bench/results/cpu_nvila_8b.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from real_dims import SETTINGS, conversation, load_policy, run_shape

MODELS = {"nvila-lite-2b": "NVILA-Lite-2B", "nvila-8b": "NVILA-8B", "nvila-15b": "NVILA-15B"}
CARDS_GIB = (8, 12, 16, 24, 48, 80)
POLICIES = ("ln_vit_qlora_llm", "frozen_vit_qlora_llm", "lora_vit_qlora_llm", "ln_vit_fp8_lora_llm", "ln_vit_lora_llm",
            "frozen_vit_lora_llm", "lora_vit_lora_llm", "ln_vit_dora_llm", "ft_vit_lora_llm", "ft_vit_ft_llm")


def planned(preset: str, setting: str) -> dict[str, tuple[float, float]]:
    """{policy: (total GiB on a GPU, allocated GiB)} at the setting's sample, with every lever."""
    import tempfile

    from nvila_ft.data.processor import NVILAProcessor
    from nvila_ft.model.presets import preset_config
    from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
    from nvila_ft.model.tokenizer import load_tokenizer
    from nvila_ft.training.planner import GIB, SampleDemand, plan

    config = preset_config(preset, torch.bfloat16)
    processor = NVILAProcessor(load_tokenizer(TINY_TOKENIZER_DIR, config.chat_template), config, multi_image_tiling=SETTINGS[setting][4])
    batch = processor(conversation(setting, Path(tempfile.gettempdir())))  # as bench/real_dims.py counts its sample
    sample = SampleDemand(int(batch["input_ids"].shape[-1]), int(batch["pixel_values"].shape[0]), int((batch["labels"][..., 1:] != -100).sum()))
    out = {}
    for name in POLICIES:
        policy = load_policy(name)
        result = plan(config, policy, sample, run_shape("levers", setting, policy, config, torch.bfloat16, "cuda"))
        out[name] = (result.total / GIB, result.allocated / GIB)
    return out, sample


def measured_runs(paths: list[Path]) -> dict[tuple[str, str, str], tuple[float, str]]:
    """{(preset, setting, policy): (tensor peak GiB, "CPU" or the GPU's name)} of the runs with every lever."""
    runs = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("mode") == "levers" and "peak_tensor_bytes" in row:
                runs[(row["preset"], row["setting"], row["policy"])] = (row["peak_tensor_bytes"] / 2**30, row.get("gpu") or "CPU")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="medical")
    parser.add_argument("--measured", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    measured = measured_runs(args.measured)
    plans = {preset: planned(preset, args.setting) for preset in MODELS}
    print("| GPU memory | " + " | ".join(f"{MODELS[p]} ({plans[p][1].positions:,} positions, {plans[p][1].tiles} tiles)" for p in MODELS) + " |")
    print("|---|" + "---|" * len(MODELS))
    shown: dict[str, set[str]] = {p: set() for p in MODELS}
    for card in CARDS_GIB:
        cells = []
        for preset in MODELS:
            fits = [(name, total) for name, (total, _) in plans[preset][0].items() if total <= card and name not in shown[preset]]
            shown[preset] |= {name for name, _ in fits}
            words = [f"`{name}` {total:.1f}" for name, total in fits]
            seen = [f"`{name}` {measured[(preset, args.setting, name)][1]} tensor peak {measured[(preset, args.setting, name)][0]:.1f}"
                    for name, _ in fits if (preset, args.setting, name) in measured]
            mark = f" (planned; measured: {', '.join(seen)})" if seen else " (planned)" if words else ""
            cells.append(("+ " if shown[preset] - {n for n, _ in fits} and words else "") + ", ".join(words) + mark)
        print(f"| {card} GB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
