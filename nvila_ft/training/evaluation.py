"""Evaluation: each record's loss during training (`record_losses`, `token_mean_loss`), and generation-based scores
(answer each record's question, score against its reference answer)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from nvila_ft.atomic import atomic_write_bytes
from nvila_ft.data.processor import NVILAProcessor
from nvila_ft.data.records import Record
from nvila_ft.domains.scoring import compute_metrics, metric_context
from nvila_ft.model.losses import summed_cross_entropy


def record_losses(
    logits: torch.Tensor, targets: torch.Tensor, counts: Sequence[int], soft_tokens: Sequence[int] = (), std: float = 1.0
) -> torch.Tensor:
    """Each record's summed token loss [B] (float32), the training loss's cross-entropy (soft for time tokens).

    logits [N, V]: the supervised positions' logits, record after record, `counts[b]` of them for record b; targets
    [N]: their next tokens. Only one record's logits are in float32 at a time.
    """
    pairs = zip(logits.split(list(counts)), targets.split(list(counts)))
    return torch.stack([summed_cross_entropy(rows.float(), target, soft_tokens, std) for rows, target in pairs])


def token_mean_loss(prediction: Any) -> dict[str, float]:
    """The Trainer's `compute_metrics` over `record_losses`: {"loss": the validation set's summed token losses over
    its supervised tokens}, as training normalises (`num_items_in_batch`). `prediction.predictions` holds each
    record's summed loss and `prediction.label_ids` its token count, gathered once per record, so the value does
    not depend on how records were batched or shared between processes."""

    def total(values: Any) -> float:  # a list of arrays when the Trainer does not concatenate batches
        parts = values if isinstance(values, (list, tuple)) else [values]
        return float(sum(np.sum(part, dtype=np.float64) for part in parts))

    return {"loss": total(prediction.predictions) / max(total(prediction.label_ids), 1.0)}


@dataclass
class Evaluation:
    scores: dict[str, float]
    rows: list[dict[str, Any]]  # one per record: origin, id, question, question_type, reference, prediction


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: NVILAProcessor,
    records: list[Record],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to each record's prompt (everything before its last assistant message).

    In a distributed run each process answers a contiguous share of the records (padded with repeats of the
    last record, so that every process generates the same number of batches), and every process gets all the
    answers back in record order: each record answered exactly once.
    """
    rank, world = _rank_and_world()
    share = -(-len(records) // world)
    mine = records[rank * share : (rank + 1) * share]
    padded = mine + [records[-1]] * (share - len(mine)) if records else []
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in tqdm(range(0, len(padded), batch_size), desc="generating", disable=not progress or None, leave=False):
            chunk = padded[start : start + batch_size]
            samples = [
                processor.process(r.prompt(), add_generation_prompt=True, sample_id=r.name, media_root=r.media_root)
                for r in chunk
            ]
            batch = processor.collate(samples, padding_side="left")
            batch = {k: v.to(model.device) for k, v in batch.items()}
            output = model.generate(**batch, max_new_tokens=max_new_tokens)
            answers += processor.batch_decode(output)
    finally:
        model.train(was_training)
    if world == 1:
        return answers
    gathered: list[list[str]] = [[] for _ in range(world)]
    torch.distributed.all_gather_object(gathered, answers[: len(mine)])
    return [answer for part in gathered for answer in part]


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate_records(
    model: Any,
    processor: NVILAProcessor,
    records: list[Record],
    metrics: list[str],
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> Evaluation:
    predictions = generate_answers(model, processor, records, batch_size, max_new_tokens, progress)
    references = [r.answer or "" for r in records]
    rows = [
        {"origin": r.origin, "id": r.id, "question": r.question, "question_type": r.question_type,
         "reference": ref, "prediction": pred} | ({"choices": r.meta["choices"]} if r.meta.get("choices") else {})
        for r, ref, pred in zip(records, references, predictions)
    ]
    scores = compute_metrics(metrics, predictions, references, **metric_context(records))
    return Evaluation(scores, rows)


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_bytes(path, text.encode())
    return Path(path)
