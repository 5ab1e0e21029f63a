"""Built-in robot sets: clips of a block sliding one way, and pick-up episodes in the native episodes layout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from nvila_ft.atomic import atomic_write_json
from nvila_ft.data.media import write_video
from nvila_ft.domains.synthetic import (
    COLORS,
    GENERATOR_VERSION,
    MANIFEST_FILE,
    build_dataset,
    check_at_least,
    check_questions,
    is_complete,
    llava_entry,
    save_png,
)

DIRECTIONS = ("left", "right", "up", "down")
QUESTIONS: dict[str, str] = {"direction": "Which way does the block move?", "block_color": "What color is the block?"}
ANSWERS: dict[str, list[str]] = {"direction": list(DIRECTIONS), "block_color": list(COLORS)}
EPISODES_FILE = "episodes.json"
MOVES = {(1, 0): "move right", (-1, 0): "move left", (0, 1): "move up", (0, -1): "move down", (0, 0): "grasp"}


def make_robot_video_dataset(
    out_dir: str | os.PathLike,
    num_records: int,
    seed: int = 0,
    frames: int = 16,
    size: int = 48,
    fps: int = 8,
    questions: Sequence[str] = ("direction",),
) -> Path:
    """Short H.264 clips of a coloured block sliding left, right, up or down over a dark background.

    "Which way does the block move?" -> "left"/"right"/"up"/"down". The block travels 40-60% of the free
    span in a straight line at constant speed from a random start, so where it starts does not give the
    direction away: the model has to compare frames. With "block_color" among `questions`, some records ask
    "What color is the block?" instead. Returns the path of data.json.
    """
    questions = check_questions(questions, ("direction", "block_color"))
    check_at_least("num_records", num_records, 1)
    check_at_least("frames", frames, 2)
    check_at_least("size", size, 16)
    params = {"num_records": num_records, "seed": seed, "frames": frames, "size": size, "fps": fps}
    if questions != ("direction",):  # the default keeps the parameters (and so the cache) of earlier versions
        params["questions"] = list(questions)

    def record(rng: np.random.Generator, index: int) -> tuple[dict[str, Any], list[Image.Image]]:
        direction = str(rng.choice(DIRECTIONS))
        color_name = str(rng.choice(list(COLORS)))
        color = COLORS[color_name]
        background = int(rng.integers(25, 61))
        block = int(rng.integers(size // 6, size // 4 + 1))
        lowest, highest = 2, size - block - 2  # block's top-left corner stays 2 px inside the frame
        travel = int(rng.integers(int(0.4 * (highest - lowest)), int(0.6 * (highest - lowest)) + 1))
        start = int(rng.integers(lowest, highest - travel + 1))
        along = np.linspace(start, start + travel, frames)
        if direction in ("left", "up"):
            along = along[::-1]
        across = int(rng.integers(lowest, highest + 1))
        clip = []
        for position in np.round(along).astype(int).tolist():
            x, y = (position, across) if direction in ("left", "right") else (across, position)
            frame = Image.new("RGB", (size, size), (background,) * 3)
            ImageDraw.Draw(frame).rectangle((x, y, x + block - 1, y + block - 1), fill=color)
            clip.append(frame)
        question = str(rng.choice(questions)) if len(questions) > 1 else "direction"
        answer = direction if question == "direction" else color_name
        return llava_entry("robot", index, "video", question, QUESTIONS[question], answer), clip

    def save(clip: list[Image.Image], path: Path) -> None:
        write_video(clip, path, fps=fps)

    return build_dataset(out_dir, "robot_video", params, questions, ANSWERS, record, save)


def make_robot_episodes_dataset(
    out_dir: str | os.PathLike,
    num_episodes: int = 300,
    seed: int = 0,
    grid: int = 4,
    cell: int = 8,
    media: str = "frames",
    fps: int = 4,
) -> Path:
    """Pick-up episodes in a `grid` x `grid` world, written in the native episodes layout (`nvila_ft.domains.robotics.episodes`).

    A coloured block sits in one cell; a white gripper (a hollow square) starts in another and moves one cell a
    step, first along x until it is in the block's column, then along y, then grasps. Frame i shows the scene
    before step i's action, so every action is decidable from the step's last frame: x = sign(block column -
    gripper column) (+1 = right), y = sign(gripper row - block row) once the columns agree (+1 = up), grip
    "close" on the block. Each step has a "subgoal", an "action" {x, y, grip} and an "action_text" ("move left",
    ..., "grasp"). `media`: "frames" (a folder of PNGs per episode) or "mp4". Returns the path of episodes.json.
    """
    check_at_least("num_episodes", num_episodes, 1)
    check_at_least("grid", grid, 2)
    check_at_least("cell", cell, 4)
    if media not in ("frames", "mp4"):
        raise ValueError(f"media must be 'frames' or 'mp4', got {media!r}")
    out_dir = Path(out_dir)
    data_path = out_dir / EPISODES_FILE
    params = {"num_episodes": num_episodes, "seed": seed, "grid": grid, "cell": cell, "media": media, "fps": fps}
    manifest = {"generator": "robot_episodes", "version": GENERATOR_VERSION, "params": params, "count": num_episodes}
    if is_complete(out_dir, manifest, EPISODES_FILE, with_answers=False):
        return data_path
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    episodes = []
    for index in range(num_episodes):
        color_name, frames, steps = _pick_up(np.random.default_rng([seed, index]), grid, cell)
        name = f"episodes/ep_{index:06d}"
        if media == "mp4":
            (out_dir / "episodes").mkdir(parents=True, exist_ok=True)
            write_video(frames, out_dir / f"{name}.mp4", fps=fps)
            name += ".mp4"
        else:
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            for k, frame in enumerate(frames):
                save_png(frame, out_dir / name / f"frame_{k:04d}.png")
        episodes.append({"episode_id": f"pick-{index:06d}", "video": name,
                         "instruction": f"Pick up the {color_name} block.", "steps": steps})
    atomic_write_json(data_path, episodes)
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return data_path


def _pick_up(rng: np.random.Generator, grid: int, cell: int) -> tuple[str, list[Image.Image], list[dict[str, Any]]]:
    """One drawn episode: the block's colour, the frames and the steps (see `make_robot_episodes_dataset`)."""
    color_name = str(rng.choice(list(COLORS)))
    cells = rng.choice(grid * grid, size=2, replace=False)
    block, gripper = divmod(int(cells[0]), grid), divmod(int(cells[1]), grid)  # (row, column)
    background = int(rng.integers(25, 61))
    frames, steps = [], []
    while True:
        frames.append(_episode_frame(grid, cell, background, COLORS[color_name], block, gripper))
        dx = int(np.sign(block[1] - gripper[1]))
        dy = 0 if dx else int(np.sign(gripper[0] - block[0]))
        on_block = gripper == block
        steps.append({
            "frame": len(frames) - 1,
            "subgoal": "grasp the block" if on_block else "line up with the block" if dx else "reach the block",
            "action": {"x": dx, "y": dy, "grip": "close" if on_block else "open"},
            "action_text": MOVES[(dx, dy)],
        })
        if on_block:
            return color_name, frames, steps
        gripper = (gripper[0] - dy, gripper[1] + dx)


def _episode_frame(grid: int, cell: int, background: int, color: tuple[int, int, int],
                   block: tuple[int, int], gripper: tuple[int, int]) -> Image.Image:
    frame = Image.new("RGB", (grid * cell, grid * cell), (background,) * 3)
    draw = ImageDraw.Draw(frame)
    row, column = block
    draw.rectangle((column * cell + 1, row * cell + 1, column * cell + cell - 2, row * cell + cell - 2), fill=color)
    row, column = gripper
    width = max(cell // 4, 1)
    draw.rectangle((column * cell, row * cell, column * cell + cell - 1, row * cell + cell - 1),
                   outline=(255, 255, 255), width=width)
    return frame
