"""Medical VQA metrics: closed, open and multiple-choice questions scored apart, as medical VQA papers report them
(the rules of each kind of answer: `nvila_ft.domains.medical.answers`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nvila_ft.domains.medical.answers import answer_type, choice_correct, medical_closed_correct, medical_words, word_recall
from nvila_ft.metrics import Metric, check_inputs, pair_token_f1


def _typed(
    predictions: Sequence[str], references: Sequence[str], question_types: Sequence[str | None] | None
) -> list[tuple[str, str, str, int]]:
    """(answer type, prediction, reference, index) of each example."""
    check_inputs(predictions, references)
    types = question_types if question_types is not None else [None] * len(predictions)
    if len(types) != len(predictions):
        raise ValueError(f"got {len(types)} question_types for {len(predictions)} predictions; they must pair up")
    return [(answer_type(t, r), p, r, i) for i, (t, p, r) in enumerate(zip(types, predictions, references))]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _medical_score(kind: str, prediction: str, reference: str, options: Mapping[str, str] | None) -> float:
    """One example's score by its answer type: accuracy (closed, choice) or word recall (open)."""
    if kind == "closed":
        return float(medical_closed_correct(prediction, reference))
    if kind == "choice":
        return float(choice_correct(prediction, reference, options))
    return word_recall(prediction, reference)


def closed_accuracy(predictions, references, question_types=None) -> dict[str, float]:
    """Accuracy (`medical_closed_correct`) over the closed questions; {} when there are none."""
    scores = [float(medical_closed_correct(p, r)) for k, p, r, _ in _typed(predictions, references, question_types) if k == "closed"]
    return {"closed_accuracy": _mean(scores)} if scores else {}


def open_recall(predictions, references, question_types=None) -> dict[str, float]:
    """Mean `word_recall` over the open questions; {} when there are none."""
    scores = [word_recall(p, r) for k, p, r, _ in _typed(predictions, references, question_types) if k == "open"]
    return {"open_recall": _mean(scores)} if scores else {}


def open_token_f1(predictions, references, question_types=None) -> dict[str, float]:
    """SQuAD token F1 of `medical_words` over the open questions; {} when there are none."""
    scores = [pair_token_f1(p, r, medical_words) for k, p, r, _ in _typed(predictions, references, question_types) if k == "open"]
    return {"open_token_f1": _mean(scores)} if scores else {}


def choice_accuracy(predictions, references, question_types=None, choices=None) -> dict[str, float]:
    """Accuracy (`choice_correct`, letter or option text) over the multiple-choice questions; {} when none."""
    options = choices if choices is not None else [None] * len(predictions)
    scores = [
        float(choice_correct(p, r, options[i]))
        for k, p, r, i in _typed(predictions, references, question_types) if k == "choice"
    ]
    return {"choice_accuracy": _mean(scores)} if scores else {}


def overall(predictions, references, question_types=None, choices=None) -> dict[str, float]:
    """Mean over all questions of each one's own score: accuracy for closed and choice questions, word
    recall for open ones (so it always exists, and a sweep can optimise it whatever the mix of types)."""
    options = choices if choices is not None else [None] * len(predictions)
    typed = _typed(predictions, references, question_types)
    return {"overall": _mean([_medical_score(k, p, r, options[i]) for k, p, r, i in typed])}


METRICS: dict[str, Metric] = {
    "closed_accuracy": closed_accuracy,
    "open_recall": open_recall,
    "open_token_f1": open_token_f1,
    "choice_accuracy": choice_accuracy,
    "overall": overall,
}
