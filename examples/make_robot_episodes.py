"""Write a small robot-episodes dataset in nvila-ft's native layout (nvila_ft/domains/robotics/episodes.py): pick-up episodes
of a gripper and a block, one mp4 (or frame folder) per episode, with per-step sub-goals and actions.

    python examples/make_robot_episodes.py DIR [--train 300] [--val 60] [--media mp4|frames]

writes DIR/train/episodes.json and DIR/val/episodes.json (different seeds, so validation episodes are unseen).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nvila_ft.domains.robotics.generators import make_robot_episodes_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=300, help="training episodes")
    parser.add_argument("--val", type=int, default=60, help="validation episodes")
    parser.add_argument("--media", choices=("mp4", "frames"), default="mp4")
    args = parser.parse_args()
    for split, count, seed in (("train", args.train, 0), ("val", args.val, 1)):
        print(make_robot_episodes_dataset(args.out / split, num_episodes=count, seed=seed, media=args.media))


if __name__ == "__main__":
    main()
