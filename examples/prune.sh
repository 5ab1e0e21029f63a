#!/usr/bin/env bash
# DeltaLoss data pruning (NVILA): fine-tune briefly (the strong model), score every training record by how much more
# likely the strong model finds its answer than the base (the weak model), keep the best half of each question type
# and answer, then train on the pruned file. On a CPU with the pretrained tiny NVILA: about 2 minutes.
#
# Your own data on a GPU: give the run folder, your train and held-out files (LLaVA JSON, media paths relative to
# the file's folder) and a real checkpoint, e.g.
#   MODEL="model=nvila_lite_2b model.path=/ckpt/NVILA-Lite-2B precision=bf16 adapters=ln_vit_qlora_llm" \
#   STRONG_STEPS=300 STEPS=2000 examples/prune.sh outputs/prune /data/train.json /data/val.json
# (`nvila-ft prune` itself reads any task source: CSV/TSV tables, JSON Lines, Hugging Face datasets, mixtures; it
# writes the pruned data in the input's own layout.)
set -euo pipefail
run=${1:-outputs/example-prune}
MODEL=${MODEL:-model=nvila_8b_tiny}
STRONG_STEPS=${STRONG_STEPS:-60}
STEPS=${STEPS:-120}          # RECORDS=... (default 800) sets the size of the built-in sample, a quarter held out
read -r -a model <<< "$MODEL"

if [[ $# -ge 3 ]]; then
    train=$2 val=$3
else  # a small LLaVA JSON dataset: built-in synthetic scans, split into train.json and a held-out val.json
    mkdir -p "$run/data"
    python - "$run/data" "${RECORDS:-800}" <<'EOF'
import json, random, sys
from pathlib import Path
from nvila_ft.domains.medical.generator import make_scan_dataset
count = int(sys.argv[2])
entries = json.loads(make_scan_dataset(Path(sys.argv[1]), count, seed=1234).read_text())
random.Random(0).shuffle(entries)
Path(sys.argv[1], "val.json").write_text(json.dumps(entries[: count // 4], indent=1))
Path(sys.argv[1], "train.json").write_text(json.dumps(entries[count // 4 :], indent=1))
EOF
    train=$run/data/train.json val=$run/data/val.json
fi
task=(task=vqa "task.train.path=$train" "task.validation=$val" task.max_new_tokens=8)

# 1. the strong model: a brief fine-tune on all of the training data
nvila-ft finetune "${task[@]}" "${model[@]}" trainer.max_steps="$STRONG_STEPS" eval.before_training=false \
    hydra.run.dir="$run/strong"
# 2. score and prune: strong = that run, weak = the base model; half of each question type is kept, and of each
#    answer where the answers are a small closed set (prune.by=auto): yes/no and left/right answers stay balanced
nvila-ft prune "${task[@]}" "${model[@]}" prune.strong="$run/strong" prune.weak=base prune.keep_fraction=0.5 \
    hydra.run.dir="$run/prune"
# 3. train on the pruned file (same layout as the input; media paths resolve under the input's folder)
nvila-ft finetune task=vqa task.train.path="$run/prune/pruned/$(basename "$train")" \
    task.train.media_root="$(dirname "$(realpath "$train")")" "task.validation=$val" task.max_new_tokens=8 \
    "${model[@]}" trainer.max_steps="$STEPS" hydra.run.dir="$run/pruned-run"
echo "report: $run/prune/prune_report.md (scores.jsonl, scores.png); pruned run: $run/pruned-run/metrics.json"
