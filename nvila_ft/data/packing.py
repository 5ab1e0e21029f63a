"""Which samples train together: packs of samples up to a token budget, or batches of similar samples.

Both work on the LLM length of every sample (after media expansion), which the data check measures.

- `pack_first_fit_decreasing`: samples sorted longest first, each into the first pack with room (a packed row,
  attention kept within each sample through restarting position ids);
- `PackedBatchSampler`: micro-batches of a few of those packs (rows), in a new random order every epoch;
- `LengthGroupedSampler`: without packing, batches of one modality and similar length, so padding is small.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from nvila_ft.errors import UserError


class PackingError(UserError, ValueError):
    """A sample that cannot be packed; the message names it."""


def pack_first_fit_decreasing(lengths: Sequence[int], max_tokens: int, names: Sequence[str] | None = None) -> list[list[int]]:
    """Sample indices grouped into packs of at most `max_tokens` positions (first fit, longest first).

    Each pack lists its samples in dataset order. A sample longer than the budget is an error naming it.
    """
    if max_tokens < 1:
        raise PackingError(f"data.max_tokens = {max_tokens}: must be >= 1")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i = too_long[0]
        name = names[i] if names is not None else f"sample {i}"
        more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
        raise PackingError(f"{name}: {lengths[i]} positions do not fit data.max_tokens = {max_tokens}{more}; raise it")
    packs: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for k, free in enumerate(room):
            if lengths[index] <= free:
                packs[k].append(index)
                room[k] -= lengths[index]
                break
        else:
            packs.append([index])
            room.append(max_tokens - lengths[index])
    return [sorted(pack) for pack in packs]


class PackedBatchSampler(Sampler[list[int]]):
    """Micro-batches of `rows` packs (packs of at most `max_tokens` positions), in a seeded random order per
    epoch; each micro-batch lists the indices of its packs one pack after another."""

    def __init__(
        self, lengths: Sequence[int], max_tokens: int, rows: int = 1, seed: int = 0, names: Sequence[str] | None = None
    ) -> None:
        self.packs = pack_first_fit_decreasing(lengths, max_tokens, names)
        self.lengths, self.max_tokens, self.rows = list(lengths), max_tokens, rows
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.packs) // self.rows)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.packs)))
        random.Random(self.seed + self.epoch).shuffle(order)
        for start in range(0, len(order), self.rows):
            yield [i for k in order[start : start + self.rows] for i in self.packs[k]]

    @property
    def empty_share(self) -> float:
        """Share of the packs' `max_tokens` rows left empty."""
        return 1 - sum(self.lengths) / (len(self.packs) * self.max_tokens) if self.packs else 0.0


class LengthGroupedSampler(Sampler[int]):
    """Sample indices in a seeded random order, rearranged so that each run of `batch_size` indices holds one
    modality and similar lengths: shuffled, cut into groups of `group_batches` batches, each group sorted by
    (modality, length, longest first)."""

    def __init__(
        self, lengths: Sequence[int], modalities: Sequence[str], batch_size: int, seed: int = 0, group_batches: int = 50
    ) -> None:
        self.lengths, self.modalities = list(lengths), list(modalities)
        self.batch_size, self.seed, self.group_batches, self.epoch = batch_size, seed, group_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.lengths)))
        random.Random(self.seed + self.epoch).shuffle(order)
        size = self.batch_size * self.group_batches
        for start in range(0, len(order), size):
            group = sorted(order[start : start + size], key=lambda i: (self.modalities[i], -self.lengths[i]))
            yield from group
