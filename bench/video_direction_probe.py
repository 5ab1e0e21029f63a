"""Why the built-in "which way does the block move?" task (task=demo_video) stays near chance on the tiny NVILA-Video:
where in the video path the direction of motion is (or is not) still readable.

For each clip of the built-in robot_video data, a pretrained tiny model's video tokens are taken (i) as the LLM
receives them (after temporal pooling, for NVILA-Video), (ii) averaged over all of them (what an attention head that
weighs the tokens alike passes on: order-blind), (iii) of the last (pooled) frame alone; a logistic-regression probe
is fitted on 300 clips and scored on the other 100 (chance 0.25).

    .venv/bin/python bench/video_direction_probe.py [--preset nvila-8b-tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.domains.robotics.generators import DIRECTIONS, make_robot_video_dataset
from nvila_ft.model.modeling_nvila import NVILAForConditionalGeneration
from nvila_ft.model.pretrained import pretrained_checkpoint


def probe(features: torch.Tensor, labels: torch.Tensor, train: int = 300, steps: int = 500) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, small L2, Adam)."""
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], int(labels.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:train] @ weight + bias, labels[:train]) + 1e-3 * weight.square().sum()
        loss.backward()
        optimizer.step()
    return ((x[train:] @ weight + bias).argmax(1) == labels[train:]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nvila-video-tiny", help="a shipped pretrained tiny preset")
    args = parser.parse_args()
    torch.manual_seed(0)
    root = pretrained_checkpoint(args.preset)
    model = NVILAForConditionalGeneration.from_pretrained(root)
    processor = NVILAProcessor.from_pretrained(root)
    spec = model.config.video_encoder
    per_frame = model.config.tokens_per_tile  # tokens of one (pooled) frame
    views: dict[str, list[torch.Tensor]] = {"video tokens (the LLM's input)": [], "their mean (order-blind)": [],
                                            "last (pooled) frame only": []}
    labels = []
    with tempfile.TemporaryDirectory() as scratch:
        data = make_robot_video_dataset(Path(scratch), 400)
        with torch.no_grad():
            for record in json.loads(data.read_text()):
                frames = processor.video_frames(record["video"], data.parent)
                tokens = model.get_video_features(frames, torch.tensor([frames.shape[0]]))  # [tokens, dim]
                for name, value in zip(views, (tokens, tokens.mean(0), tokens[-per_frame:])):
                    views[name].append(value.flatten())
                labels.append(DIRECTIONS.index(record["conversations"][1]["value"]))
    pooling = f"temporal pooling {list(spec.pool_sizes)}" if spec.kind == "tsp_video" else "no temporal pooling"
    print(f"{args.preset}: {processor.num_video_frames} frames, {pooling}, {per_frame} tokens per (pooled) frame; "
          "held-out direction accuracy of a linear probe (chance 0.25)")
    print("| features | dims | accuracy |\n|---|---|---|")
    for name, rows in views.items():
        features = torch.stack(rows)
        print(f"| {name} | {features.shape[1]} | {probe(features, torch.tensor(labels)):.2f} |")


if __name__ == "__main__":
    main()
