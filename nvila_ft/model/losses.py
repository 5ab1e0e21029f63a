"""The next-token losses: cross-entropy, soft for temporal-localisation tokens (`<t0>`, `<t1>`, ... in NVILA-Video
checkpoints), from full logits or from the supervised positions' hidden states only (selective loss)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nvila_ft.model.tokenizer import IGNORE_INDEX

# Rows projected through lm_head at a time by the selective loss: 1024 x the 151,648-token vocabulary is 0.6 GB of
# float32 logits, alive only while its chunk's loss is computed (and again in backward).
LOSS_CHUNK_ROWS = 1024


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, soft_tokens: Sequence[int] = (), std: float = 1.0) -> torch.Tensor:
    """Sum of the losses of rows `logits` [N, V] (float32) with targets [N] (all supervised); a time-token target
    is a Gaussian over neighbouring time tokens, every other target the usual one-hot."""
    if not soft_tokens:
        return F.cross_entropy(logits, targets, reduction="sum")
    soft = torch.tensor(list(soft_tokens), device=targets.device)
    is_soft = torch.isin(targets, soft)
    loss = F.cross_entropy(logits[~is_soft], targets[~is_soft], reduction="sum")
    if is_soft.any():
        distance = targets[is_soft, None].float() - soft[None, :].float()
        weights = torch.exp(-(distance**2) / (2 * std**2))
        dense = torch.zeros_like(logits[is_soft])
        dense[:, soft] = weights / weights.sum(dim=1, keepdim=True)
        loss = loss + F.cross_entropy(logits[is_soft], dense, reduction="sum")
    return loss


def _normaliser(count: int, num_items_in_batch: torch.Tensor | int | None, like: torch.Tensor) -> torch.Tensor | int:
    """What the summed loss is divided by: the supervised tokens of the batch, or of the whole accumulated step
    when the Trainer gives `num_items_in_batch` (as transformers' own loss does)."""
    if num_items_in_batch is None:
        return count
    return num_items_in_batch.to(like.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch


def soft_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    soft_tokens: Sequence[int],
    std: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Next-token loss where a time-token target is a Gaussian over neighbouring time tokens.

    Other targets use ordinary cross-entropy; the sum is divided by the number of supervised tokens, as in the
    official NVILA loss (or by `num_items_in_batch` when given).
    """
    logits = logits[..., :-1, :].float().flatten(0, -2)
    targets = labels[..., 1:].flatten()
    keep = targets != IGNORE_INDEX
    logits, targets = logits[keep], targets[keep]
    if targets.numel() == 0:
        return logits.sum() * 0.0
    loss = summed_cross_entropy(logits, targets, soft_tokens, std)
    return loss / _normaliser(targets.numel(), num_items_in_batch, loss)


def _chunk_loss(lm_head: nn.Module, rows: torch.Tensor, targets: torch.Tensor, soft_tokens: tuple[int, ...], std: float) -> torch.Tensor:
    return summed_cross_entropy(lm_head(rows).float(), targets, soft_tokens, std)


def selective_cross_entropy(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    soft_tokens: Sequence[int] = (),
    std: float = 1.0,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """The next-token loss of the decoder's last hidden states [B, L, D] without the logits of every position.

    Only the rows whose next token is supervised go through `lm_head`, `chunk_rows` (default LOSS_CHUNK_ROWS) at a
    time; each chunk runs under activation checkpointing, so its float32 logits are freed after its loss and
    recomputed in backward. The value equals cross-entropy over the full logits (soft for `soft_tokens`): the sum over supervised tokens divided by
    their number, or by `num_items_in_batch` when given. `lm_head` is used as it is (LoRA-wrapped or not).
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].flatten()  # position t predicts token t + 1
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden_states.flatten(0, -2).index_select(0, keep.to(hidden_states.device))
    targets = targets[keep].to(rows.device)
    soft = tuple(int(t) for t in soft_tokens)
    if rows.shape[0] == 0:  # nothing supervised: a zero that still reaches lm_head (every process runs the same graph)
        return lm_head(rows).float().sum() * 0.0
    save_memory = torch.is_grad_enabled()
    chunk_rows = chunk_rows or LOSS_CHUNK_ROWS
    total = None
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = (lm_head, rows[start : start + chunk_rows], targets[start : start + chunk_rows], soft, std)
        loss = checkpoint(_chunk_loss, *chunk, use_reentrant=False) if save_memory else _chunk_loss(*chunk)
        total = loss if total is None else total + loss
    return total / _normaliser(rows.shape[0], num_items_in_batch, total)
