"""Visual-token cost per input size for the real NVILA families (sizes only; no weights needed).

    .venv/bin/python bench/token_counts.py
"""

from __future__ import annotations

from nvila_ft.data.token_counts import image_cost, video_cost
from nvila_ft.model.presets import preset_config

SIZES = [(448, 448), (1000, 1000), (1344, 896), (896, 1344), (1920, 1080), (640, 480), (3000, 500), (500, 3000)]


def main() -> None:
    families = {name: preset_config(name) for name in ("nvila-8b", "nvila-lite-2b", "nvila-8b-video")}
    print("| image (W x H) | " + " | ".join(f"{n}: tiles / grid / LLM positions" for n in families) + " |")
    print("|---" * (len(families) + 1) + "|")
    for width, height in SIZES:
        cells = []
        for config in families.values():
            cost = image_cost(config, width, height)
            grid = f"{cost.grid[0]}x{cost.grid[1]}" if cost.grid else "1 tile"
            cells.append(f"{cost.tiles} / {grid} / {cost.positions}")
        print(f"| {width} x {height} | " + " | ".join(cells) + " |")
    single = [str(image_cost(c, 1344, 896, tile=False).positions) for c in families.values()]
    print("| any image, >1 image in a prompt | " + " | ".join(single) + " |")
    print()
    print("| video frames | " + " | ".join(f"{n}: LLM positions" for n in families) + " |")
    print("|---" * (len(families) + 1) + "|")
    for frames in (8, 32, 256):
        print(f"| {frames} | " + " | ".join(str(video_cost(c, frames).positions) for c in families.values()) + " |")


if __name__ == "__main__":
    main()
