#!/usr/bin/env bash
# Medical VQA on synthetic scans (a bright lesion or not, left or right): validate -> fine-tune -> evaluate ->
# export merged -> answer with the export. For real data use task=medical_vqa task.train.path=... (LLaVA JSON).
set -euo pipefail
run=${1:-outputs/example-medical}
nvila-ft validate-data task=demo_scan hydra.run.dir="$run/validate"
# The tiny model starts from random weights, so it is trained in full (adapters=ft_vit_ft_llm reaches 100%
# held-out accuracy here in about a minute; LoRA on a random LLM only learns the answer prior). With a real
# checkpoint, adapters=ln_vit_lora_llm (the official recommendation) or ln_vit_qlora_llm is the usual choice.
nvila-ft finetune task=demo_scan adapters=ft_vit_ft_llm trainer.max_steps=1000 hydra.run.dir="$run"
nvila-ft evaluate run="$run" hydra.run.dir="$run/evaluate"
nvila-ft export run="$run" export.output="$run/merged" export.overwrite=true hydra.run.dir="$run/export"
scans=("${NVILA_FT_CACHE:-$HOME/.cache/nvila-ft}"/builtin/scan-*/images/*.png)
scan=${scans[0]}
nvila-ft predict model.path="$run/merged" adapters=none predict.prompt="Is there a lesion?" predict.image="$scan" \
    hydra.run.dir="$run/predict"
