#!/usr/bin/env bash
# Referring-expression grounding from RefCOCO-style records: make a small data set (images + {"image", "sentences"
# / "expression", "bbox" [x, y, w, h] in pixels}), fine-tune, evaluate (Acc@0.5, mean IoU), then ask for a box.
# Answers are "[x1, y1, x2, y2]", fractions of the original image (nvila_ft/domains/grounding/boxes.py).
#
# CPU, about 7 minutes: the pretrained tiny NVILA (the default model). Its LLM never had to write a digit in
# pretraining and gives digits almost no probability; LoRA on its layers does not lift that (the loss stays near
# uniform), so the example trains the tiny LLM fully. Real NVILA checkpoints write numbers: keep LoRA there.
# GPU, a real checkpoint: change the overrides, e.g.
#   MODEL="model=nvila_8b model.path=/ckpt/NVILA-8B trainer=nvila adapters=ln_vit_lora_llm" bash examples/grounding.sh
# and use your own RefCOCO-style file (task.train.path=refs.json, task.train.bbox_format=xywh|xyxy).
set -euo pipefail
run=${1:-outputs/example-grounding}
records=${RECORDS:-2000}        # training records to create (plus a quarter as many for validation)
steps=${STEPS:-4000}
model=${MODEL:-"adapters=ln_vit_lora_llm adapters.llm.method=full"}
extra=${EXTRA:-}                # more finetune overrides, e.g. "eval.before_training=false trainer.per_device_train_batch_size=4"
data="$run/data"
mkdir -p "$data/images"

# 1. RefCOCO-style records: a few coloured shapes per image on a 3x3 layout, images of different sizes and
#    aspect ratios; the box of the named shape in pixels, [x, y, w, h] as COCO writes it.
${PYTHON:-python} - "$data" "$records" <<'EOF'
import json, random, sys
from PIL import Image, ImageDraw

out, count = sys.argv[1], int(sys.argv[2])
colors = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
rng = random.Random(0)

def make(name):
    width, height = rng.choice([(96, 64), (64, 96), (80, 80), (120, 72)])
    image = Image.new("RGB", (width, height), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    shapes = []
    for cell, color in zip(rng.sample(range(9), 3), rng.sample(list(colors), 3)):
        row, col = divmod(cell, 3)
        cw, ch = width // 3, height // 3
        w, h = int(cw * rng.uniform(0.7, 0.9)), int(ch * rng.uniform(0.7, 0.9))
        x, y = col * cw + rng.randint(0, cw - w), row * ch + rng.randint(0, ch - h)
        kind = rng.choice(["circle", "square"])
        (draw.ellipse if kind == "circle" else draw.rectangle)((x, y, x + w - 1, y + h - 1), fill=colors[color])
        shapes.append((f"the {color} {kind}", [x, y, w, h]))
    image.save(f"{out}/images/{name}.png")
    sentence, bbox = rng.choice(shapes)
    return {"image": f"images/{name}.png", "sentences": [{"sent": sentence}], "bbox": bbox, "id": name}

for split, n in (("train", count), ("val", max(count // 4, 4))):
    with open(f"{out}/{split}.json", "w") as f:
        json.dump([make(f"{split}_{i:04d}") for i in range(n)], f)
EOF

# 2. fine-tune on train.json, scored on val.json before and after (metrics.json: iou_accuracy, mean_iou, ...)
nvila-ft finetune task=grounding task.train.path="$data/train.json" task.validation="$data/val.json" \
    $model trainer.max_steps="$steps" $extra hydra.run.dir="$run"
# 3. evaluate the run again (predictions.jsonl holds each answer beside its reference)
nvila-ft evaluate run="$run" hydra.run.dir="$run/evaluate"
# 4. ask for one box: the first validation image and its expression
sentence=$(${PYTHON:-python} -c 'import json, sys; print(json.load(open(sys.argv[1]))[0]["sentences"][0]["sent"])' "$data/val.json")
nvila-ft predict run="$run" predict.image="$data/images/val_0000.png" predict.max_new_tokens=32 \
    predict.prompt="Please provide the bounding box coordinate of the region this sentence describes: $sentence." \
    hydra.run.dir="$run/predict"
