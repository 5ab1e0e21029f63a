#!/usr/bin/env bash
# Medical VQA from a dataset in SLAKE's own layout (imgs/<id>/source.jpg|.dcm + train.json / validate.json):
# make a small sample -> validate -> fine-tune -> evaluate (closed accuracy and open recall apart) -> export merged.
#
# CPU, tiny pretrained NVILA, about 2-3 minutes:   bash examples/medical_slake.sh [OUT_DIR]
# GPU, real checkpoint and the real SLAKE (Slake1.0/{train,validate}.json + imgs/): set the variables, e.g.
#   DATA=/data/Slake1.0 STEPS=2000 \
#   MODEL="model=nvila_lite_2b model.path=/ckpt/NVILA-Lite-2B precision=bf16 adapters=ln_vit_qlora_llm" \
#   bash examples/medical_slake.sh outputs/slake
# (DATA given: no sample is made.) DICOM images are shown with their own window; set WINDOW=lung (or bone, brain,
# mediastinum, soft_tissue, abdomen, liver, full, "[40,400]") for a fixed CT window. SLAKE's Chinese questions are
# left out (task.train.language=en); add LANGUAGE=null for both languages.
set -euo pipefail
out=${1:-outputs/example-slake}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
steps=${STEPS:-300}
if [[ -z "${DATA:-}" ]]; then
    DATA="$out/slake-sample"
    "$python" "$here/make_slake_sample.py" "$DATA"
fi
# shellcheck disable=SC2206  # MODEL is a list of overrides on purpose
model=(${MODEL:-model=nvila_8b_tiny})
task=(task=slake "task.train.path=$DATA/train.json" "task.validation=$DATA/validate.json"
      "task.train.language=${LANGUAGE:-en}" "data.dicom_window=${WINDOW:-null}")

nvila-ft validate-data "${model[@]}" "${task[@]}" hydra.run.dir="$out/validate"
nvila-ft finetune "${model[@]}" "${task[@]}" trainer.max_steps="$steps" trainer.per_device_train_batch_size=8 \
    hydra.run.dir="$out/run"
nvila-ft evaluate run="$out/run" hydra.run.dir="$out/evaluate"
"$python" - "$out/evaluate/metrics.json" <<'PY'
import json, sys
scores = json.load(open(sys.argv[1]))
print("closed/open split:", {k: round(v, 3) for k, v in scores["metrics"].items()})
print("by answer type:", scores["metrics_by_question_type"])
PY
nvila-ft export run="$out/run" export.output="$out/merged" export.overwrite=true hydra.run.dir="$out/export"
