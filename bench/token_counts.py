"""Visual-token cost per input size for the real NVILA families (sizes only; no weights needed).

    .venv/bin/python bench/token_counts.py
"""

from __future__ import annotations

from nvila_ft.model.media_layout import MediaLayout
from nvila_ft.model.presets import preset_config
from nvila_ft.model.tiny_tokenizer import TINY_TOKENIZER_DIR
from nvila_ft.model.tokenizer import load_tokenizer

SIZES = [(448, 448), (1000, 1000), (1344, 896), (896, 1344), (1920, 1080), (640, 480), (3000, 500), (500, 3000)]


def main() -> None:
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)  # "\n" is one token, as in Qwen2's vocabulary
    families = {name: MediaLayout.from_tokenizer(preset_config(name), tokenizer) for name in ("nvila-8b", "nvila-lite-2b", "nvila-8b-video")}
    print("| image (W x H) | " + " | ".join(f"{n}: tiles / grid / LLM positions" for n in families) + " |")
    print("|---" * (len(families) + 1) + "|")
    for width, height in SIZES:
        cells = []
        for layout in families.values():
            plan = layout.image(width, height)
            grid = f"{plan.grid[0]}x{plan.grid[1]}" if plan.grid else "1 tile"
            cells.append(f"{plan.tiles} / {grid} / {plan.positions}")
        print(f"| {width} x {height} | " + " | ".join(cells) + " |")
    single = [str(layout.image(1344, 896, tiled=False).positions) for layout in families.values()]
    print("| any image, >1 image in a prompt | " + " | ".join(single) + " |")
    print()
    print("| video frames | " + " | ".join(f"{n}: LLM positions" for n in families) + " |")
    print("|---" * (len(families) + 1) + "|")
    for frames in (8, 32, 256):
        print(f"| {frames} | " + " | ".join(str(layout.video_positions(frames)) for layout in families.values()) + " |")


if __name__ == "__main__":
    main()
