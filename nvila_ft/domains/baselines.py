"""References that never look at the media, so that a model that ignores its images is recognisable.

- majority answer: every validation question gets the most common training answer;
- question prior: every validation question gets the most common training answer among training records of
  the same question type (the record's `question_type` when the data has one, else the same question text),
  falling back to the majority answer for a question never seen in training;
- each domain's own (`BASELINES` of `nvila_ft.domains.registry`), where it applies: e.g. the grounding pack's mean
  box (when every training answer is a box): every question gets the mean training box.

A fine-tuned model that scores no better than the question prior has learnt the answer distribution, not
the task. Answers are compared after `normalize_answer`, so "Yes" and "yes." count as one answer.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from nvila_ft.data.records import Record
from nvila_ft.domains.registry import BASELINES as DOMAIN_BASELINES
from nvila_ft.domains.scoring import compute_metrics, metric_context
from nvila_ft.metrics import normalize_answer


def _question_key(record: Record) -> str:
    kind = record.question_type
    return f"type:{kind}" if kind is not None else f"text:{normalize_answer(record.question, drop_articles=False)}"


def _most_common(answers: Sequence[str]) -> str:
    """The most common answer after normalisation (ties: the first seen), in its first written form."""
    counts = Counter(normalize_answer(a) for a in answers)
    best = max(counts.values())
    return next(a for a in answers if counts[normalize_answer(a)] == best)


def baseline_predictions(train: Sequence[Record], validation: Sequence[Record]) -> dict[str, list[str]]:
    """{baseline name: one prediction per validation record}; empty when training has no answers."""
    answers = [r.answer for r in train if r.answer]
    if not answers:
        return {}
    majority = _most_common(answers)
    by_question: dict[str, list[str]] = defaultdict(list)
    for record in train:
        if record.answer:
            by_question[_question_key(record)].append(record.answer)
    prior = {key: _most_common(values) for key, values in by_question.items()}
    baselines = {
        "majority_answer": [majority] * len(validation),
        "question_prior": [prior.get(_question_key(r), majority) for r in validation],
    }
    for name, baseline in DOMAIN_BASELINES.items():
        answer = baseline(answers)
        if answer is not None:
            baselines[name] = [answer] * len(validation)
    return baselines


def baseline_scores(train: Sequence[Record], validation: Sequence[Record], metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """{baseline name: the task's metrics of its predictions on `validation`}."""
    if not validation:
        return {}
    references = [r.answer or "" for r in validation]
    context = metric_context(validation)
    return {
        name: compute_metrics(metrics, predictions, references, **context)
        for name, predictions in baseline_predictions(train, validation).items()
    }


def scores_by_question_type(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, dict[str, float]]:
    """{question type: {metric: score, "count": n}} of evaluated rows that carry a "question_type"; a type the
    metric does not score (e.g. closed_accuracy of open questions) is left out."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("question_type") is not None:
            groups[str(row["question_type"])].append(row)
    out = {}
    for kind, members in sorted(groups.items()):
        scores = compute_metrics([metric], [r["prediction"] for r in members], [r["reference"] for r in members],
                                 question_types=[kind] * len(members), choices=[r.get("choices") for r in members])
        if metric in scores:
            out[kind] = {metric: scores[metric], "count": scores["count"]}
    return out


def describe_baselines(baselines: dict[str, dict[str, float]], metric: str) -> str:
    """" (image-blind baselines: majority answer 0.500, question prior 0.512)", or "" without baselines."""
    if not baselines:
        return ""
    shown = ", ".join(f"{name.replace('_', ' ')} {scores[metric]:.3f}" for name, scores in baselines.items())
    return f" (image-blind baselines: {shown})"


def describe_by_question_type(by_type: dict[str, dict[str, float]], metric: str) -> str:
    """"color 0.950 (n=150), shape 0.880 (n=160)"."""
    return ", ".join(f"{kind} {scores[metric]:.3f} (n={scores['count']:.0f})" for kind, scores in by_type.items())
