"""A fine-tuned run through the Python API: adapters onto the base, merged export, reload two ways.

    python examples/export_and_reload.py outputs/<run>          # a run made by `nvila-ft finetune`
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from nvila_ft.adapters import load_for_policy
from nvila_ft.adapters.artifacts import load_adapters, read_policy
from nvila_ft.adapters.merge import export_merged
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration


def main(run: Path) -> None:
    adapters = run / "final"
    policy, meta = read_policy(adapters)
    base = meta["base_checkpoint"]  # the checkpoint the adapters were trained on (a run's base/ for presets)
    model = load_adapters(load_for_policy(base, policy, device="cpu"), adapters).model
    processor = NVILAProcessor.from_pretrained(base)

    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((36, 8, 56, 28), fill=(30, 60, 220))
    question = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What color is the shape?"}]}]
    prompt = processor(question, add_generation_prompt=True)
    print("adapted:", processor.batch_decode(model.generate(**prompt, max_new_tokens=6)))

    probe = processor(question + [{"role": "assistant", "content": "blue"}])
    report = export_merged(model, run / "merged-example", probe, overwrite=True)
    print(f"merged into {report.path}: max logit difference {report.max_abs_diff:.2e} (tolerance {report.tolerance:.2e})")

    merged = NVILAForConditionalGeneration.from_pretrained(report.path)
    print("merged:", processor.batch_decode(merged.generate(**prompt, max_new_tokens=6)))
    llm = Qwen2ForCausalLM.from_pretrained(report.path / "llm")  # plain transformers read the sub-folders
    vision = SiglipVisionModel.from_pretrained(report.path / "vision_tower")
    same = torch.equal(llm.lm_head.weight, merged.llm.lm_head.weight) and vision.config.image_size == merged.config.tile_size
    print("plain transformers load the merged llm/ and vision_tower/:", same)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else sys.exit(__doc__))
