#!/usr/bin/env bash
# A 2x3 sweep: two policies x three vision learning-rate ratios, each job in its own folder and W&B run
# (offline: `wandb sync <job>/wandb/offline-run-*` uploads later). Add hydra/sweeper=optuna for a search.
set -euo pipefail
nvila-ft finetune -m adapters=ln_vit_lora_llm,lora_vit_lora_llm adapters.vision_tower.lr_ratio=0.02,0.1,0.5 \
    trainer.max_steps=300 logger=wandb hydra.sweep.dir="${1:-multirun/example-sweep}"
