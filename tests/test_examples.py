"""The domain examples of examples/ run end to end at toy size, each on the data it writes in its native layout.

(examples/grounding.sh runs in tests/test_grounding.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, args: list[str], tmp_path: Path, **variables: str) -> None:
    env = dict(os.environ, NVILA_FT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="offline", PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **variables)
    result = subprocess.run(["bash", str(EXAMPLES / script), *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def read_json(path: Path):
    return json.loads(path.read_text())


@pytest.mark.slow
def test_medical_slake_example(tmp_path):
    out = tmp_path / "slake"
    run_example("medical_slake.sh", [str(out)], tmp_path, STEPS="2")
    sample = read_json(out / "slake-sample" / "train.json")
    assert {"qid", "img_name", "question", "answer", "answer_type", "q_lang"} <= set(sample[0])
    assert any(entry["img_name"].endswith(".dcm") for entry in sample)
    scores = read_json(out / "evaluate" / "metrics.json")["metrics"]
    assert {"closed_accuracy", "open_recall", "open_token_f1", "overall"} <= set(scores)
    assert (out / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_robot_episodes_example(tmp_path):
    run = tmp_path / "robot"
    run_example("robot_episodes.sh", [str(run)], tmp_path, STEPS="2", TRAIN_EPISODES="4", VAL_EPISODES="2")
    episodes = read_json(run / "data" / "train" / "episodes.json")
    assert len(episodes) == 4 and {"episode_id", "video", "instruction", "steps"} <= set(episodes[0])
    evaluated = read_json(run / "evaluate" / "metrics.json")
    for key in ("action_exact_match", "action_field_accuracy", "action_field_accuracy/x",
                "action_field_accuracy/grip", "action_malformed_rate"):
        assert 0 <= evaluated["metrics"][key] <= 1
    assert "action_exact_match" in evaluated["image_blind_baselines"]["majority_answer"]
    assert (run / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_prune_example(tmp_path):
    run = tmp_path / "prune"
    run_example("prune.sh", [str(run)], tmp_path, RECORDS="48", STRONG_STEPS="2", STEPS="2")
    original = read_json(run / "data" / "train.json")
    pruned = read_json(run / "prune" / "pruned" / "train.json")
    assert 0 < len(pruned) < len(original) and all(entry in original for entry in pruned)  # entries copied as they were
    decisions = [json.loads(line)["decision"] for line in (run / "prune" / "scores.jsonl").read_text().splitlines()]
    assert len(decisions) == len(original) and decisions.count("kept") == len(pruned)
    assert (run / "prune" / "scores.png").is_file()
    assert read_json(run / "pruned-run" / "metrics.json")["steps"] == 2


@pytest.mark.slow
def test_dpo_example(tmp_path):
    run = tmp_path / "dpo"
    run_example("dpo.sh", [str(run), "trainer.max_steps=2", "trainer.eval_steps=1", "trainer.save_steps=1",
                                     "trainer.logging_steps=1"], tmp_path)
    pairs = read_json(run / "data" / "prefs.json")
    assert {"image", "conversations", "chosen", "rejected"} <= set(pairs[0])
    rewards = read_json(run / "train" / "metrics.json")["rewards"]
    assert {"rewards/margins", "rewards/accuracies"} <= set(rewards["last"])
    assert (run / "merged" / "config.json").is_file()
