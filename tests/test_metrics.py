"""Generation metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from nvila_ft.domains.medical.answers import choice_correct
from nvila_ft.domains.registry import METRICS
from nvila_ft.domains.scoring import compute_metrics
from nvila_ft.metrics import accuracy, bleu, closed_answer_correct, exact_match, normalize_answer, rouge_l, token_f1

from tests.tolerances import METRIC  # float64 metrics within 64 roundings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The Red  cat. ", "red cat"),
        ("Yes.", "yes"),
        ("\tTOP\n left!", "top left"),
        ("(B)", "b"),
        ("A.", "a"),  # an answer that is only an article keeps it
        ("an apple", "apple"),
        ("3.5 kg", "3.5 kg"),  # inner punctuation is kept
        ("“don't”", "don't"),
        ("a - b", "b"),
        ("...", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    predictions = ["The cat.", "red", "A", "", "the"]
    references = ["cat", "Red!", "(a)", "A", "the"]
    # hits: cat=cat, red=red, a=a, ""!="a", the=the
    assert exact_match(predictions, references) == {"exact_match": 4 / 5}


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        ("Yes, it is.", "yes", True),
        ("yes", "Yes", True),
        ("No.", "yes", False),
        ("yeah", "yes", False),
        ("The red one", "red", True),
        ("blue", "red", False),
        ("top left", "top left", True),
        ("Top-left", "top left", False),
        ("top left corner", "top left", True),
        ("top", "top left", False),
        ("B", "B", True),
        ("(B) cat", "B", True),
        ("B.", "(B)", True),
        ("b) a cat", "B", True),
        ("A", "a", True),
        ("(A) the dog", "A", True),
        ("C", "A", False),
        ("", "A", False),
        ("cat", "B", False),
        ("", "yes", False),
    ],
)
def test_closed_answer_correct(prediction, reference, correct):
    assert closed_answer_correct(prediction, reference) is correct


def test_choice_answer_that_begins_with_two_options_picks_the_longer():
    # B's text begins with A's: an answer beginning with B's text begins with A's too, and is B
    options = {"A": "left lung", "B": "left lung upper lobe", "C": "right lung", "D": "upper lobe"}
    answer = "Left lung upper lobe, near the hilum."
    assert choice_correct(answer, "B", options) and not choice_correct(answer, "A", options)
    assert choice_correct("Left lung, lower part.", "A", options)  # only A's text begins it
    assert choice_correct("left lung", "A", options) and not choice_correct("left lung", "B", options)  # A's text exactly


def test_accuracy_averages():
    assert accuracy(["Yes, it is.", "no", "(B) cat", "green"], ["yes", "yes", "B", "red"]) == {"accuracy": 0.5}


def test_token_f1_by_hand():
    # "the red cat" -> [red, cat]; "a red dog" -> [red, dog]; one common word: P = R = 1/2, F1 = 1/2.
    assert token_f1(["the red cat"], ["a red dog"]) == {"token_f1": 0.5}
    # [red, red, cat] vs [red, dog]: common = min(2, 1) red = 1; P = 1/3, R = 1/2, F1 = 2/5.
    assert token_f1(["red red cat"], ["red dog"])["token_f1"] == pytest.approx(0.4, abs=METRIC)
    # Averaged over examples: (1 + 0 + 1 (both empty) + 0 (one empty)) / 4.
    assert token_f1(["Cat.", "dog", "", ""], ["cat", "cat", "...", "cat"]) == {"token_f1": 0.5}


def test_bleu_identical_disjoint_and_by_hand():
    sentences = ["a small red square in the top left corner", "the block moves to the right side"]
    assert bleu(sentences, sentences)["bleu"] == pytest.approx(100.0, abs=100 * METRIC)
    assert bleu(["one two three four five"], ["six seven eight nine ten"])["bleu"] == 0.0
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat", equal lengths so no brevity penalty.
    # Clipped n-gram precisions: 1-gram 5/6 (second "the" unmatched), 2-gram 3/5, 3-gram 2/4, 4-gram 1/3.
    expected = 100 * math.exp(sum(math.log(p) for p in (5 / 6, 3 / 5, 2 / 4, 1 / 3)) / 4)
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"])["bleu"] == pytest.approx(expected, abs=100 * METRIC)  # BLEU is on a 0-100 scale
    assert expected == pytest.approx(53.728, abs=5e-4)  # half a unit of the figure quoted to 3 decimals


def test_rouge_l_by_hand():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == {"rouge_l": 1.0}
    # LCS of "the cat sat" in "the cat sat on the mat" = 3: P = 3/3, R = 3/6, F = 2/3.
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"])["rouge_l"] == pytest.approx(2 / 3, abs=METRIC)
    # "the cat is on the mat" vs "the cat sat on the mat": LCS the-cat-on-the-mat = 5 of 6 each side.
    # Averaged with a disjoint pair: (5/6 + 0) / 2.
    score = rouge_l(["the cat is on the mat", "yes"], ["the cat sat on the mat", "no"])["rouge_l"]
    assert score == pytest.approx(5 / 12, abs=METRIC)
    # Porter stemming: "moves" and "moving" both stem to "move".
    assert rouge_l(["block moving"], ["block moves"])["rouge_l"] == pytest.approx(1.0, abs=METRIC)


def test_compute_metrics_combines_and_counts():
    result = compute_metrics(["accuracy", "exact_match", "token_f1"], ["Yes, it is.", "red"], ["yes", "blue"])
    assert result == {"accuracy": 0.5, "exact_match": 0.0, "token_f1": pytest.approx(0.25, abs=METRIC), "count": 2.0}
    assert compute_metrics("rouge_l", ["a b"], ["a b"]) == {"rouge_l": 1.0, "count": 1.0}
    assert {"exact_match", "accuracy", "token_f1", "bleu", "rouge_l", "iou_accuracy", "iou_accuracy_75"} <= set(METRICS)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_bad_inputs_are_refused(name):
    metric = METRICS[name]
    with pytest.raises(ValueError, match="empty"):
        metric([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(TypeError):
        metric("yes", "yes")


def test_unknown_metric_names_the_choices():
    with pytest.raises(ValueError, match="available"):
        compute_metrics(["accuracy", "cider"], ["a"], ["a"])
