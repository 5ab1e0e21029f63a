"""Image-blind baselines, on a fixture small enough to work out by hand."""

from __future__ import annotations

import pytest

from nvila_ft.data.records import Record
from nvila_ft.domains.baselines import baseline_predictions, baseline_scores, scores_by_question_type
from tests.tolerances import METRIC  # float64 metrics: 64 roundings of values <= 1


def record(question: str, answer: str, kind: str | None = None, index: int = 0) -> Record:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Record(messages, f"data.json[{index}]", meta={"question_type": kind} if kind else {})


TRAIN = [
    record("Is there a lesion?", "yes", "lesion"),
    record("Is there a lesion?", "Yes.", "lesion"),  # the same answer once normalised
    record("Is there a lesion?", "no", "lesion"),
    record("Which side?", "left", "side"),
    record("Which side?", "right", "side"),
    record("Which side?", "left", "side"),
    record("Which side?", "left", "side"),
]
VALIDATION = [
    record("Is there a lesion?", "no", "lesion"),
    record("Is there a lesion?", "yes", "lesion"),
    record("Which side?", "right", "side"),
    record("Which side?", "left", "side"),
    record("How big?", "small", "size"),  # a type never seen in training falls back to the majority answer
]


def test_majority_and_question_prior_by_hand():
    predictions = baseline_predictions(TRAIN, VALIDATION)
    # majority over all training answers: left 3, yes 2, no 1, right 1 -> "left"
    assert predictions["majority_answer"] == ["left"] * 5
    # per type: lesion -> yes (2 of 3), side -> left (3 of 4), size unseen -> majority "left"
    assert predictions["question_prior"] == ["yes", "yes", "left", "left", "left"]
    scores = baseline_scores(TRAIN, VALIDATION, ["accuracy", "exact_match"])
    assert scores["majority_answer"]["exact_match"] == pytest.approx(1 / 5, abs=METRIC, rel=0)  # only "left" is right
    assert scores["question_prior"]["exact_match"] == pytest.approx(2 / 5, abs=METRIC, rel=0)  # "yes" and "left"


def test_question_text_is_the_prior_key_without_types():
    train = [record("Colour?", "red"), record("Colour?", "red"), record("Shape?", "circle"), record("shape? ", "square"),
             record("Shape?", "circle")]
    validation = [record("Colour?", "blue"), record("SHAPE?", "circle")]
    assert baseline_predictions(train, validation)["question_prior"] == ["red", "circle"]
    assert baseline_scores([], validation, ["accuracy"]) == {}  # nothing to learn an answer from


def test_scores_by_question_type():
    rows = [
        {"question_type": "lesion", "prediction": "yes", "reference": "yes"},
        {"question_type": "lesion", "prediction": "no", "reference": "yes"},
        {"question_type": "side", "prediction": "left", "reference": "left"},
        {"question_type": None, "prediction": "x", "reference": "y"},
    ]
    assert scores_by_question_type(rows, "exact_match") == {
        "lesion": {"exact_match": 0.5, "count": 2.0},
        "side": {"exact_match": 1.0, "count": 1.0},
    }
