"""Smoke demo: build each tiny NVILA, answer a question about a built-in image and video, show token counts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from nvila_ft.data.media import write_video
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.presets import TINY_PRESETS, save_preset_checkpoint


def demo_image(width: int = 96, height: int = 64) -> Image.Image:
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).ellipse((10, 10, 40, 40), fill="red")
    return image


def demo_frames(count: int = 16, size: int = 48) -> list[Image.Image]:
    frames = []
    for t in range(count):
        frame = Image.new("RGB", (size, size), "black")
        x = int(t * (size - 12) / max(count - 1, 1))
        ImageDraw.Draw(frame).rectangle((x, 18, x + 12, 30), fill="yellow")
        frames.append(frame)
    return frames


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        video = write_video(demo_frames(), Path(workdir) / "demo.mp4")
        for preset in TINY_PRESETS:
            checkpoint = save_preset_checkpoint(Path(workdir) / preset, preset)
            model = NVILAForConditionalGeneration.from_pretrained(checkpoint)
            processor = NVILAProcessor.from_pretrained(checkpoint)
            for kind, source, question in (
                ("image", demo_image(), "What shape is in the image?"),
                ("video", str(video), "Where does the square move?"),
            ):
                prompt = [{"role": "user", "content": [{"type": kind, kind: source}, {"type": "text", "text": question}]}]
                sample = processor.process(prompt, add_generation_prompt=True)
                inputs = processor(prompt, add_generation_prompt=True)
                answer = processor.batch_decode(model.generate(**inputs, max_new_tokens=8))[0]
                media_positions = sample.length - len(sample.input_ids) + (len(sample.images) or len(sample.videos))
                print(
                    f"{preset:17s} {kind}: {media_positions:4d} visual positions "
                    f"({np.sum([i.tiles.shape[0] for i in sample.images] or [sum(v.shape[0] for v in sample.videos)])} "
                    f"tiles/frames), prompt {sample.length} positions -> {answer!r} (random weights)"
                )


if __name__ == "__main__":
    main()
