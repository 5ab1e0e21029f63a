"""What `nvila-ft plan`'s model predicts for NVILA-8B at the paper's Table 5 setting, levers off and on (no weights).

The paper's accounting: batch 1, one 448x448 tile (256 visual tokens), an LLM context of 300, bf16. "allocated" is
the tensor peak (a GPU's `max_memory_allocated`); "on the GPU" adds the CUDA context and the allocator's slack.
Levers: `trainer.selective_loss=true trainer.gradient_checkpointing=true trainer.optim=adamw_bnb_8bit
precision.trainable_float32=false`.

    .venv/bin/python bench/plan_official.py
"""

from __future__ import annotations

import argparse

import torch

from real_dims import load_policy

PAPER_TABLE_5_GB = {"ln_vit_qlora_llm": 10.2, "ln_vit_lora_llm": 19.2, "lora_vit_lora_llm": 20.1, "lora_vit_qlora_llm": 11.1,
                    "ft_vit_lora_llm": 21.9, "ft_vit_ft_llm": 63.5, "ln_vit_fp8_lora_llm": None}
ISSUE_TARGET_GB = {"ln_vit_qlora_llm": 7, "ln_vit_lora_llm": 17.5, "ln_vit_fp8_lora_llm": 12}


def main() -> None:
    from nvila_ft.model.presets import preset_config
    from nvila_ft.training.planner import RunShape, SampleDemand, plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nvila-8b")
    parser.add_argument("--positions", type=int, default=300)
    parser.add_argument("--supervised", type=int, default=11)
    args = parser.parse_args()
    config = preset_config(args.preset, torch.bfloat16)
    sample = SampleDemand(args.positions, 1, args.supervised)
    off = RunShape(weights_dtype=torch.bfloat16)
    on = RunShape(weights_dtype=torch.bfloat16, selective_loss=True, checkpointing=("vision_tower", "llm"), optim="adamw_bnb_8bit",
                  trainable_float32=False)
    print("| preset | paper Table 5 (GB) | issue target (GB) | planned, levers off: allocated / on the GPU (GB) | planned, levers on (GB) |")
    print("|---|---|---|---|---|")
    for name, paper in PAPER_TABLE_5_GB.items():
        policy = load_policy(name)
        a, b = plan(config, policy, sample, off), plan(config, policy, sample, on)
        target = ISSUE_TARGET_GB.get(name, "-")
        print(f"| `{name}` | {paper if paper is not None else '-'} | {target} | {a.allocated / 1e9:.1f} / {a.total / 1e9:.1f} | "
              f"{b.allocated / 1e9:.1f} / {b.total / 1e9:.1f} |")


if __name__ == "__main__":
    main()
