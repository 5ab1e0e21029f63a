#!/usr/bin/env bash
# The GPU benchmark suite (issues 8 and 17), one script that finishes in under 8 minutes on one H100/H200:
#   (a) the paper's Table 5 sample: NVILA-8B, batch 1, one 448x448 tile, ~300 positions, for the low-memory presets
#       (LN-ViT + QLoRA / LoRA / FP8-base LoRA), each with every memory lever (levers), with none (none) and the
#       plain PEFT baseline; then NVILA-15B LN/QLoRA with every lever and the baseline;
#   (b) NVILA-8B LN/QLoRA with every lever on one 1024x768 radiograph through Dynamic-S2 (medical);
#   (c) NVILA-8B, one 1344x896 image through Dynamic-S2 (3,073 positions) + 512 text tokens, checkpointing on;
#   (d) NVILA-Lite-2B, an 8-frame video + 256 text tokens.
# Every run is one JSON line (bench/real_dims.py) in $OUT/gpu.jsonl, beside the environment in $OUT/env.txt.
#
#   bash bench/gpu_suite.sh            # on the GPU machine (random weights drawn on the GPU, no download)
#   TOY=1 bash bench/gpu_suite.sh      # rehearsal on a CPU at toy width (nvila-8b-small stands in for every model)
#
# Needs torch (CUDA), transformers, peft, accelerate, bitsandbytes, torchao, hydra-core, omegaconf: the wheels the
# GPU machine lacks are fetched here by `bash bench/gpu_wheels.sh` into .whl/, carried, and installed offline first:
#   run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=560)   -> $OUT/gpu.jsonl, $OUT/env.txt
set -euo pipefail
OUT=${OUT:-$(mktemp -d)}
WORK=${WORK:-/tmp/nvila-real-dims}
STEPS=${STEPS:-20}
DEADLINE=$((SECONDS + ${BUDGET_S:-450}))  # the whole suite stays under 8 minutes: later runs are skipped, not cut
PY=${PYTHON:-python}
SITE=
if [ -d .whl ]; then  # offline, beside the image's packages (they stay as they are)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && SITE=/tmp/site
fi
export PYTHONPATH=$PWD${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
BIG=nvila-8b; HUGE=nvila-15b; LITE=nvila-lite-2b
if [ "${TOY:-0}" = 1 ]; then BIG=nvila-8b-small; HUGE=nvila-8b-small; LITE=nvila-8b-small; STEPS=${STEPS_TOY:-2}; fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU"
  $PY -c "import torch, transformers, peft, bitsandbytes, torchao; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__, 'torchao', torchao.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
run() {
  left=$((DEADLINE - SECONDS)); if [ $left -lt 30 ]; then echo "{\"skipped\": \"$*\"}" >> "$OUT/gpu.jsonl"; return; fi
  timeout $left $PY bench/real_dims.py --workdir "$WORK" --steps "$STEPS" --out "$OUT/gpu.jsonl" "$@" || echo "{\"failed\": \"$*\"}" >> "$OUT/gpu.jsonl"
}
run --preset $BIG --setting paper --policies ln_vit_qlora_llm ln_vit_lora_llm ln_vit_fp8_lora_llm --modes levers none baseline
run --preset $HUGE --setting paper --policies ln_vit_qlora_llm --modes levers baseline
run --preset $BIG --setting medical --policies ln_vit_qlora_llm --modes levers
run --preset $BIG --setting s2 --policies ln_vit_lora_llm --modes levers baseline
run --preset $LITE --setting video --policies ln_vit_lora_llm --modes levers baseline
echo "results: $OUT/gpu.jsonl"
