#!/usr/bin/env bash
# Robot-video QA: which way does the block move? NVILA-Video layout (TSP temporal pooling over 8 frames), from the
# pretrained tiny NVILA-Video with LayerNorm ViT + LoRA LLM. Moving blocks are part of the tiny models'
# pretraining mixture, so this shows the whole video path (mp4 decoding, frame sampling, pooling, training,
# evaluation) on a model that already reads motion (held-out accuracy 0.68 -> 0.75 here, image-blind 0.27). It
# needs the NVILA-Video preset: the per-frame nvila_8b_tiny (the default model) stays near chance on motion (0.27 ->
# 0.33), see bench/video_direction_probe.py. For per-step robot actions from episodes see robot_episodes.sh.
# With a real checkpoint use model=nvila_8b_video model.path=...
set -euo pipefail
run=${1:-outputs/example-robot-video}
nvila-ft finetune model=nvila_video_tiny task=demo_video adapters=ln_vit_lora_llm trainer.max_steps=300 \
    trainer.per_device_train_batch_size=4 hydra.run.dir="$run"
nvila-ft evaluate run="$run" hydra.run.dir="$run/evaluate"
