"""Batch tensors of processed samples: padded rows of one sample each, or packed rows of several; the batch's media
concatenated in reading order (the order of their placeholders)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers import BatchFeature

from nvila_ft.model.tokenizer import IGNORE_INDEX

if TYPE_CHECKING:
    from nvila_ft.data.processor import ProcessedSample


def padded_batch(samples: list[ProcessedSample], pad_id: int, padding_side: str = "right") -> BatchFeature:
    """Token ids (and labels, when every sample has them) padded with `pad_id` on `padding_side`, an attention mask,
    and the samples' media."""
    longest = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
    with_labels = all(s.labels is not None for s in samples)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long) if with_labels else None
    for b, sample in enumerate(samples):
        n = len(sample.input_ids)
        span = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
        input_ids[b, span] = torch.tensor(sample.input_ids)
        attention_mask[b, span] = 1
        if labels is not None:
            labels[b, span] = torch.tensor(sample.labels)
    data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        data["labels"] = labels
    return BatchFeature(data | _media_tensors(samples))


def packed_batch(rows: list[list[ProcessedSample]], pad_id: int) -> BatchFeature:
    """Training samples packed into rows: each row holds its samples one after another, with position ids
    restarting at 0 for each sample and no attention mask, so that attention stays within each sample. Rows
    are padded to the longest (padding: its own positions, label -100); media in reading order."""
    if any(s.labels is None for row in rows for s in row):
        raise ValueError("only training samples (with labels) are packed")
    longest = max(sum(s.length for s in row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        used = sum(s.length for s in row)
        input_ids[r, :used] = torch.tensor([t for s in row for t in s.input_ids])
        labels[r, :used] = torch.tensor([t for s in row for t in s.labels])
        position_ids[r] = torch.tensor([i for s in row for i in range(s.length)] + list(range(longest - used)))
    data = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return BatchFeature(data | _media_tensors([s for row in rows for s in row]))


def _media_tensors(samples: list[ProcessedSample]) -> dict[str, torch.Tensor]:
    data = {}
    images = [item for s in samples for item in s.images]
    if images:
        data["pixel_values"] = torch.cat([item.tiles for item in images])
        data["image_grids"] = torch.tensor([item.grid or (0, 0) for item in images], dtype=torch.long)
    videos = [video for s in samples for video in s.videos]
    if videos:
        data["video_pixel_values"] = torch.cat(videos)
        data["video_frame_counts"] = torch.tensor([v.shape[0] for v in videos], dtype=torch.long)
    return data
