#!/usr/bin/env bash
# Preference tuning (DPO with TRL) on your own preference file: writes a small one in the LLaVA-style layout
#   {"id", "image", "conversations": [{"from": "human", "value": "<image>\nQ"}], "chosen": "...", "rejected": "..."}
# with its images, validates it, runs `nvila-ft dpo` (reference = the policy with its adapters disabled), then
# evaluates the run (generation against the chosen replies) and exports the merged model.
#
# CPU, a few minutes: the pretrained tiny NVILA (the default model=nvila_8b_tiny), as below.
# GPU, a real checkpoint: pass overrides after the run directory, e.g.
#   examples/dpo.sh outputs/dpo-2b model=nvila_lite_2b model.path=/ckpt/NVILA-Lite-2B precision=bf16 \
#       trainer=nvila trainer.learning_rate=5e-6 dpo.beta=0.1 adapters=ln_vit_qlora_llm
# Other losses: dpo.loss_type=ipo (or hinge, robust, apo_zero, ...); dpo.beta sets the pull towards the reference.
set -euo pipefail
run=${1:-outputs/example-dpo}
shift || true
data="$run/data"
mkdir -p "$data/images"
python - "$data" <<'PY'
import json, random, sys
from pathlib import Path
from PIL import Image, ImageDraw

colors = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
root, rng, records = Path(sys.argv[1]), random.Random(0), []
for i in range(240):
    color = rng.choice(list(colors))
    image = Image.new("RGB", (64, 64), (245, 245, 240))
    x, y = rng.randint(4, 30), rng.randint(4, 30)
    ImageDraw.Draw(image).rectangle((x, y, x + 28, y + 28), fill=colors[color])
    image.save(root / "images" / f"{i:04d}.png")
    records.append({
        "id": f"pref-{i:04d}",
        "image": f"images/{i:04d}.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat color is the shape?"}],
        "chosen": color,
        "rejected": rng.choice([c for c in colors if c != color]),
    })
(root / "prefs.json").write_text(json.dumps(records[:216], indent=1))
(root / "prefs_val.json").write_text(json.dumps(records[216:], indent=1))
PY
task=(task=preference task.train.path="$data/prefs.json" task.validation="$data/prefs_val.json" 'task.metrics=[accuracy]' task.objective=accuracy task.max_new_tokens=4)
nvila-ft validate-data "${task[@]}" hydra.run.dir="$run/validate" "$@"
nvila-ft dpo "${task[@]}" trainer.max_steps=80 trainer.learning_rate=2e-3 dpo.beta=0.5 trainer.eval_steps=40 \
    trainer.save_steps=40 hydra.run.dir="$run/train" "$@"
nvila-ft evaluate run="$run/train" hydra.run.dir="$run/evaluate"
nvila-ft export run="$run/train" export.output="$run/merged" export.overwrite=true hydra.run.dir="$run/export"
python - "$run/train/metrics.json" <<'PY'
import json, sys
rewards = json.load(open(sys.argv[1])).get("rewards") or {}
if rewards:
    print("TRL rewards, first -> last log:", {k: f"{rewards['first'][k]:.3f} -> {rewards['last'][k]:.3f}" for k in rewards["first"]})
else:
    print("no rewards logged: the run was shorter than trainer.logging_steps")
PY
