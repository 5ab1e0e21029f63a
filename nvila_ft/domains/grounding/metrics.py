"""Grounding metrics: IoU of predicted and reference boxes (`nvila_ft.domains.grounding.boxes`' format)."""

from __future__ import annotations

from collections.abc import Sequence

from nvila_ft.domains.grounding.boxes import iou, parse_box
from nvila_ft.metrics import Metric, check_inputs


def iou_accuracy(predictions: Sequence[str], references: Sequence[str], threshold: float = 0.5) -> dict[str, float]:
    """Boxes written as `nvila_ft.domains.grounding.boxes` says ("[x1, y1, x2, y2]", fractions of the image):

    - iou_accuracy: share of predictions whose IoU with the reference box is >= `threshold` (RefCOCO's
      Acc@0.5 by default; the key is "iou_accuracy_<100 x threshold>" for another threshold);
    - mean_iou: the IoU averaged over all examples;
    - malformed_box_rate: share of predictions from which no box could be read (`parse_box`).
    A malformed prediction, or a reference that is not a box, counts as IoU 0: a miss, never an error.
    """
    check_inputs(predictions, references)
    ious, malformed = [], 0
    for prediction, reference in zip(predictions, references):
        predicted, expected = parse_box(prediction).box, parse_box(reference).box
        malformed += predicted is None
        ious.append(iou(predicted, expected) if predicted is not None and expected is not None else 0.0)
    key = "iou_accuracy" if threshold == 0.5 else f"iou_accuracy_{round(threshold * 100)}"
    return {
        # 1e-9: an IoU of exactly the threshold is a hit although 2-decimal arithmetic lands a hair below it
        key: sum(value >= threshold - 1e-9 for value in ious) / len(ious),
        "mean_iou": sum(ious) / len(ious),
        "malformed_box_rate": malformed / len(ious),
    }


def iou_accuracy_75(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`iou_accuracy` at the stricter IoU >= 0.75 (key "iou_accuracy_75"; mean_iou and the malformed rate too)."""
    return iou_accuracy(predictions, references, threshold=0.75)


METRICS: dict[str, Metric] = {"iou_accuracy": iou_accuracy, "iou_accuracy_75": iou_accuracy_75}
