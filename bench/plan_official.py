"""What `nvila-ft plan`'s model predicts for NVILA-8B at the paper's Table 5 setting, levers off and on (no weights).

The paper's accounting: batch 1, one 448x448 tile (256 visual tokens), an LLM context of 300, bf16. "allocated" is
the tensor peak (a GPU's `max_memory_allocated`); "on the GPU" adds the CUDA context and the allocator's slack.
Levers on: every lever the policy and model allow (`real_dims.run_shape("levers", ...)`: selective loss,
checkpointing of both components, 8-bit AdamW, 16-bit trained tensors, the embedding table in host memory, lm_head
and a frozen / LayerNorm-tuned vision tower in int8 rows).

    .venv/bin/python bench/plan_official.py [--preset nvila-15b]
"""

from __future__ import annotations

import argparse

import torch

from real_dims import load_policy, run_shape

PAPER_TABLE_5_GB = {"ln_vit_qlora_llm": 10.2, "ln_vit_lora_llm": 19.2, "lora_vit_lora_llm": 20.1, "lora_vit_qlora_llm": 11.1,
                    "ft_vit_lora_llm": 21.9, "ft_vit_ft_llm": 63.5, "ln_vit_fp8_lora_llm": None}
ISSUE_TARGET_GB = {"nvila-8b": {"ln_vit_qlora_llm": 6.0, "ln_vit_lora_llm": 16.5, "ln_vit_fp8_lora_llm": 10},
                  "nvila-15b": {"ln_vit_qlora_llm": 11}}  # issue 17


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
    print("| preset | paper Table 5 (GB) | issue target (GB) | planned, levers off: allocated / on the GPU (GB) | planned, levers on (GB) |")
    print("|---|---|---|---|---|")
    for name, paper in PAPER_TABLE_5_GB.items():
        policy = load_policy(name)
        on = run_shape("levers", "paper", policy, config, torch.bfloat16, "cuda")
        a, b = plan(config, policy, sample, off), plan(config, policy, sample, on)
        target = ISSUE_TARGET_GB.get(args.preset, {}).get(name, "-")
        paper = paper if args.preset == "nvila-8b" else None  # the paper measured NVILA-8B
        print(f"| `{name}` | {paper if paper is not None else '-'} | {target} | {a.allocated / 1e9:.1f} / {a.total / 1e9:.1f} | "
              f"{b.allocated / 1e9:.1f} / {b.total / 1e9:.1f} |")


if __name__ == "__main__":
    main()
