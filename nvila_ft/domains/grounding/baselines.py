"""The grounding baseline: every question gets the mean training box."""

from __future__ import annotations

from collections.abc import Sequence

from nvila_ft.domains.grounding.boxes import format_box, parse_box


def mean_box(answers: Sequence[str]) -> str | None:
    """The coordinate-wise mean of box answers, written as a box; None unless every answer is a box."""
    boxes = [parse_box(a).box for a in answers]
    if not boxes or any(b is None for b in boxes):
        return None
    return format_box(tuple(sum(b[i] for b in boxes) / len(boxes) for i in range(4)))
