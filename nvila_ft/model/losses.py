"""Soft cross-entropy for temporal-localisation tokens (`<t0>`, `<t1>`, ... in NVILA-Video checkpoints)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvila_ft.model.tokenizer import IGNORE_INDEX


def soft_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, soft_tokens: list[int], std: float = 1.0
) -> torch.Tensor:
    """Next-token loss where a time-token target is a Gaussian over neighbouring time tokens.

    Other targets use ordinary cross-entropy; the sum is divided by the number of supervised tokens, as in the
    official NVILA loss.
    """
    logits = logits[..., :-1, :].float().flatten(0, -2)
    targets = labels[..., 1:].flatten()
    keep = targets != IGNORE_INDEX
    logits, targets = logits[keep], targets[keep]
    if targets.numel() == 0:
        return logits.sum() * 0.0
    soft = torch.tensor(soft_tokens, device=targets.device)
    is_soft = torch.isin(targets, soft)
    loss = F.cross_entropy(logits[~is_soft], targets[~is_soft], reduction="sum")
    if is_soft.any():
        distance = targets[is_soft, None].float() - soft[None, :].float()
        weights = torch.exp(-(distance**2) / (2 * std**2))
        dense = torch.zeros_like(logits[is_soft])
        dense[:, soft] = weights / weights.sum(dim=1, keepdim=True)
        loss = loss + F.cross_entropy(logits[is_soft], dense, reduction="sum")
    return loss / targets.numel()
