"""Torch dataset and collator over Records: media are loaded and tokenised in `__getitem__` (data-loader
workers do it in parallel), batches are padded (or packed) by the processor."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from nvila_ft.data.packing import pack_first_fit_decreasing
from nvila_ft.data.processor import NVILAProcessor, ProcessedSample
from nvila_ft.data.records import Record


class ConversationDataset(Dataset):
    """Training samples: every record becomes input ids + labels + pixels (truncated to model_max_length)."""

    def __init__(self, records: list[Record], processor: NVILAProcessor) -> None:
        self.records = records
        self.processor = processor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ProcessedSample:
        record = self.records[index]
        return self.processor.process(
            record.messages, with_labels=True, sample_id=record.name, media_root=record.media_root
        )


class Collator:
    """Right-padded batches, or (`max_tokens` given) packed rows of at most `max_tokens` positions, padded to the
    longest row; plus `num_positions` (LLM positions, for tokens/s)."""

    def __init__(self, processor: NVILAProcessor, max_tokens: int | None = None) -> None:
        self.processor = processor
        self.max_tokens = max_tokens

    def __call__(self, samples: list[ProcessedSample]) -> dict[str, Any]:
        if self.max_tokens is None:
            batch = self.processor.collate(samples, padding_side="right")
        else:
            rows = pack_first_fit_decreasing([s.length for s in samples], self.max_tokens)
            batch = self.processor.pack([[samples[i] for i in row] for row in rows])
        batch = dict(batch)
        batch["num_positions"] = torch.tensor(sum(s.length for s in samples))
        return batch
