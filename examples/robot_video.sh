#!/usr/bin/env bash
# Robot-video QA: which way does the block move? NVILA-Video layout (TSP temporal pooling over 8 frames).
# This exercises the whole video path (mp4 decoding, frame sampling, pooling, training, evaluation). The tiny
# random model sees each frame as 2x2 tokens and stays near chance on motion direction (measured: 0.29 after
# 2000 steps, chance 0.25); a real NVILA-Video checkpoint (model=nvila_8b_video model.path=...) is the point.
set -euo pipefail
run=${1:-outputs/example-robot-video}
nvila-ft finetune model=nvila_video_tiny task=demo_video adapters=ft_vit_ft_llm trainer.max_steps=400 \
    trainer.per_device_train_batch_size=4 hydra.run.dir="$run"
nvila-ft evaluate run="$run" hydra.run.dir="$run/evaluate"
