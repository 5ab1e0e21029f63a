#!/usr/bin/env bash
# Medical VQA on synthetic scans (a bright lesion or not, left or right): validate -> fine-tune -> evaluate ->
# export merged -> answer with the export. The pretrained tiny NVILA never saw these scans; the official
# recommendation (LayerNorm-tuned ViT + LoRA LLM) adapts it in a few hundred steps. For real data use
# task=medical_vqa task.train.path=... (LLaVA JSON) with model=nvila_lite_2b model.path=/ckpt/NVILA-Lite-2B.
set -euo pipefail
run=${1:-outputs/example-medical}
nvila-ft validate-data task=demo_scan hydra.run.dir="$run/validate"
nvila-ft finetune task=demo_scan adapters=ln_vit_lora_llm trainer.max_steps=500 hydra.run.dir="$run"
nvila-ft evaluate run="$run" hydra.run.dir="$run/evaluate"
nvila-ft export run="$run" export.output="$run/merged" export.overwrite=true hydra.run.dir="$run/export"
scans=("${NVILA_FT_CACHE:-$HOME/.cache/nvila-ft}"/builtin/scan-*/images/*.png)
scan=${scans[0]}
nvila-ft predict model.path="$run/merged" adapters=none predict.prompt="Is there a lesion?" predict.image="$scan" \
    hydra.run.dir="$run/predict"
