"""Medical VQA metrics (closed/open/choice split) against values worked out by hand."""

from __future__ import annotations

import pytest

from nvila_ft.domains.baselines import scores_by_question_type
from nvila_ft.domains.medical.answers import answer_type, choice_correct, medical_closed_correct, medical_words, word_recall, yes_no
from nvila_ft.domains.scoring import compute_metrics

from tests.tolerances import METRIC  # float64 metrics within 64 roundings


@pytest.mark.parametrize(
    ("text", "polarity"),
    [("Yes, there is.", "yes"), ("Y", "yes"), ("Present", "yes"), ("positive.", "yes"), ("TRUE", "yes"),
     ("No", "no"), ("absent", "no"), ("Negative", "no"), ("not seen", "no"), ("n", "no"),
     ("left lung", None), ("normal", None), ("", None)],
)
def test_yes_no(text, polarity):
    assert yes_no(text) == polarity


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [("Present.", "yes", True), ("absent", "No", True), ("Not present", "no", True), ("yes", "no", False),
     ("no abnormality", "yes", False), ("Positive", "Yes", True), ("left", "Left", True), ("right", "left", False),
     ("CT scan", "CT", True), ("yes", "absent", False)],
)
def test_medical_closed_correct(prediction, reference, correct):
    assert medical_closed_correct(prediction, reference) is correct


def test_answer_type_named_or_inferred():
    assert answer_type("CLOSED", "left") == "closed"
    assert answer_type("OPEN ", "yes") == "open"
    assert answer_type("Yes/No", "x") == "closed"
    assert answer_type(None, "Yes") == "closed"
    assert answer_type(None, "B") == "choice"
    assert answer_type("PRES", "brain") == "open"  # a VQA-RAD category, not an answer type: inferred


def test_choice_by_letter_or_text():
    options = {"A": "CT", "B": "MRI", "C": "A mass", "D": "Ultrasound"}
    assert choice_correct("B", "B", options)
    assert choice_correct("(B) MRI", "B", options)
    assert choice_correct("mri", "B", options)
    assert choice_correct("A mass", "C", options)  # the option's text, not the letter A
    assert not choice_correct("A", "C", options)
    assert choice_correct("Ultrasound of the liver", "D", options)
    assert not choice_correct("CT", "B", options)


def test_word_recall():
    assert word_recall("the left lung", "left lung") == 1.0
    assert word_recall("lung", "Left lung") == 0.5
    assert word_recall("liver", "left lung") == 0.0
    assert word_recall("lung lung", "lung lung heart") == 2 / 3


def test_word_recall_normalises_like_llava_med():
    # LLaVA-Med's normalize_word (eval_metrics/glossary.py): "-" and "/" separate words, number words are digits.
    assert word_recall("x ray", "X-ray") == 1.0
    assert word_recall("left", "left-sided") == 0.5  # "left sided": 1 of 2 words
    assert word_recall("two lesions", "2 lesions") == 1.0
    assert word_recall("CT", "ct/mri") == 0.5
    assert medical_words("Two X-ray/CT views.") == ["2", "x", "ray", "ct", "views"]
    # open token F1 shares the normalisation: "2" vs "two" is a full match
    assert compute_metrics(["open_token_f1"], ["two"], ["2"], question_types=["open"])["open_token_f1"] == 1.0
    # deliberate: a repeated predicted word counts once per occurrence in the reference (LLaVA-Med: 2/3)
    assert word_recall("lung lung", "left lung") == 0.5


def test_split_metrics_by_hand():
    predictions = ["Yes", "absent", "left", "left lung", "the heart", "B", "MRI"]
    references = ["yes", "yes", "Left", "right lung", "heart and liver", "B", "C"]
    types = ["CLOSED", "closed", "closed", "open", "open", "choice", "choice"]
    choices = [None] * 5 + [{"A": "CT", "B": "MRI", "C": "X-ray"}] * 2
    names = ["closed_accuracy", "open_recall", "open_token_f1", "choice_accuracy", "overall", "accuracy"]
    scores = compute_metrics(names, predictions, references, question_types=types, choices=choices)
    # closed: yes=yes, absent!=yes, left=left -> 2/3
    assert scores["closed_accuracy"] == pytest.approx(2 / 3, abs=METRIC)
    # open recall: "right lung" 1 of 2 words; "heart and liver" 1 of 3 -> (1/2 + 1/3) / 2
    assert scores["open_recall"] == pytest.approx((1 / 2 + 1 / 3) / 2, abs=METRIC)
    # token F1: (p=1/2, r=1/2 -> 1/2); ("heart" vs heart,and,liver: p=1, r=1/3 -> 1/2)
    assert scores["open_token_f1"] == pytest.approx(0.5, abs=METRIC)
    # choice: B=B; "MRI" is option B, reference C -> 1/2
    assert scores["choice_accuracy"] == pytest.approx(0.5, abs=METRIC)
    assert scores["overall"] == pytest.approx((1 + 0 + 1 + 1 / 2 + 1 / 3 + 1 + 0) / 7, abs=METRIC)
    assert scores["count"] == 7 and "accuracy" in scores  # generic metrics still run beside them


def test_split_metric_without_its_type_is_absent_and_types_are_inferred_without_types():
    scores = compute_metrics(["closed_accuracy", "open_recall", "overall"], ["yes", "liver"], ["No", "liver"])
    assert scores == {"closed_accuracy": 0.0, "open_recall": 1.0, "overall": 0.5, "count": 2.0}
    only_open = compute_metrics(["closed_accuracy", "open_recall"], ["x"], ["y"], question_types=["open"])
    assert "closed_accuracy" not in only_open and only_open["open_recall"] == 0.0


def test_context_length_must_match():
    with pytest.raises(ValueError, match="question_types"):
        compute_metrics(["overall"], ["a", "b"], ["a", "b"], question_types=["open"])


def test_scores_by_question_type_with_split_metric():
    rows = [
        {"question_type": "CLOSED", "prediction": "Positive", "reference": "yes"},
        {"question_type": "CLOSED", "prediction": "no", "reference": "yes"},
        {"question_type": "OPEN", "prediction": "lung", "reference": "left lung"},
    ]
    assert scores_by_question_type(rows, "overall") == {
        "CLOSED": {"overall": 0.5, "count": 2.0}, "OPEN": {"overall": 0.5, "count": 1.0}}
    assert scores_by_question_type(rows, "closed_accuracy") == {"CLOSED": {"closed_accuracy": 0.5, "count": 2.0}}
