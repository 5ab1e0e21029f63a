"""Robot action metrics over the action text format of `nvila_ft.domains.robotics.actions` ("x=+1 y=0 grip=open")."""

from __future__ import annotations

from collections.abc import Sequence

from nvila_ft.domains.robotics.actions import parse_action_text
from nvila_ft.metrics import Metric, check_inputs, normalize_answer


def _parsed_actions(predictions: Sequence[str], references: Sequence[str]) -> list[tuple[dict[str, str] | None, dict[str, str] | None]]:
    """(prediction's fields or None when malformed, reference's fields or None) per example, in the action text
    format of `nvila_ft.domains.robotics.actions` ("x=+1 y=0 grip=open"). A prediction is malformed when it does not parse or
    its fields are not exactly the reference's."""
    check_inputs(predictions, references)
    pairs = []
    for prediction, reference in zip(predictions, references):
        expected = parse_action_text(reference)
        got = parse_action_text(prediction)
        reference_fields = expected.values if expected.ok else None
        well_formed = got.ok and reference_fields is not None and set(got.values) == set(reference_fields)
        pairs.append((got.values if well_formed else None, reference_fields))
    return pairs


def action_exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Fraction of predicted actions with every field right (malformed predictions count as wrong; a reference
    that is not in the action format is compared as normalised text)."""
    hits = 0
    for (got, expected), prediction, reference in zip(_parsed_actions(predictions, references), predictions, references):
        hits += got == expected if expected is not None else normalize_answer(prediction) == normalize_answer(reference)
    return {"action_exact_match": hits / len(predictions)}


def action_field_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Per action field, the fraction of examples (whose reference has the field) predicting it right, as
    "action_field_accuracy/<field>", and their mean as "action_field_accuracy". A malformed prediction is wrong on
    every field."""
    hits: dict[str, int] = {}
    totals: dict[str, int] = {}
    for got, expected in _parsed_actions(predictions, references):
        for name, value in (expected or {}).items():
            totals[name] = totals.get(name, 0) + 1
            hits[name] = hits.get(name, 0) + (got is not None and got[name] == value)
    per_field = {f"action_field_accuracy/{name}": hits[name] / totals[name] for name in totals}
    mean = sum(per_field.values()) / len(per_field) if per_field else 0.0
    return {"action_field_accuracy": mean, **per_field}


def action_malformed_rate(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Fraction of predictions that are not a well-formed action with exactly the reference's fields."""
    pairs = _parsed_actions(predictions, references)
    return {"action_malformed_rate": sum(got is None for got, _ in pairs) / len(pairs)}


METRICS: dict[str, Metric] = {
    "action_exact_match": action_exact_match,
    "action_field_accuracy": action_field_accuracy,
    "action_malformed_rate": action_malformed_rate,
}
