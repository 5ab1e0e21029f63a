"""examples/medical_slake.sh in small: its SLAKE-layout sample, a short fine-tune scoring closed and open apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import run_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_example_script_parses():
    subprocess.run(["bash", "-n", str(EXAMPLES / "medical_slake.sh")], check=True)


@pytest.mark.slow
def test_slake_sample_finetune_reports_the_closed_open_split(tmp_path):
    data = tmp_path / "slake"
    made = subprocess.run([sys.executable, str(EXAMPLES / "make_slake_sample.py"), str(data), "--images", "12",
                           "--validation-images", "6"], capture_output=True, text=True, check=True)
    assert "train and" in made.stdout
    train = json.loads((data / "train.json").read_text(encoding="utf-8"))
    assert {"qid", "img_id", "img_name", "question", "answer", "answer_type", "q_lang", "location", "modality",
            "base_type", "content_type"} <= set(train[0])
    assert {e["answer_type"] for e in train} == {"OPEN", "CLOSED"} and {e["q_lang"] for e in train} == {"en", "zh"}
    assert any(e["img_name"].endswith(".dcm") for e in train) and (data / "imgs" / train[0]["img_name"]).is_file()

    run = tmp_path / "run"
    run_cli(["finetune", "task=slake", f"task.train.path={data / 'train.json'}", f"task.validation={data / 'validate.json'}",
             "trainer.max_steps=2", "trainer.per_device_train_batch_size=4", "eval.before_training=false",
             "data.dicom_window=soft_tissue", f"hydra.run.dir={run}"], tmp_path, tmp_path / "cache")
    metrics = json.loads((run / "metrics.json").read_text())
    scores = metrics["metrics"]["after_training"]
    assert {"closed_accuracy", "open_recall", "open_token_f1", "overall", "count"} == set(scores)
    by_type = metrics["metrics_by_question_type"]["after_training"]
    assert set(by_type) == {"closed", "open"} and by_type["closed"]["count"] + by_type["open"]["count"] == scores["count"]
    english = [e for e in json.loads((data / "validate.json").read_text(encoding="utf-8")) if e["q_lang"] == "en"]
    assert scores["count"] == len(english)  # the Chinese questions are left out by task.train.language=en
    rows = [json.loads(line) for line in (run / "predictions_after_training.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == {str(e["qid"]) for e in english}
