"""The loss functions of `nvila_ft.model.losses` on small tensors, against cross-entropy written out by hand:
the selective loss at every chunk boundary, the soft time-token targets at any width, and what the chunked
loss keeps for backward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nvila_ft.model.losses import selective_cross_entropy, soft_cross_entropy
from tests.tolerances import reordered, scale_of

IGNORE = -100
# float32 both sides, summed in other orders (chunks, one call per row): each result passes through the head's dot
# product (6), a logsumexp over the vocabulary (13) and the sum over at most 18 positions: n = 37 roundings
N = 6 + 13 + 18


def hand_loss(logits: torch.Tensor, labels: torch.Tensor, soft: list[int] = (), std: float = 1.0, divide_by=None) -> torch.Tensor:
    """Position t predicts label t + 1; -100 is not supervised; a soft target's weights are exp(-d^2 / 2 std^2)."""
    total, count = torch.zeros(()), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE:
                continue
            log_probs = torch.log_softmax(logits[b, t].float(), -1)
            if target in soft:
                weights = torch.tensor([math.exp(-((target - s) ** 2) / (2 * std**2)) for s in soft])
                total = total - (weights / weights.sum() * log_probs[list(soft)]).sum()
            else:
                total = total - log_probs[target]
            count += 1
    return total / (divide_by if divide_by is not None else count)


@pytest.fixture
def case():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 6)
    head = nn.Linear(6, 13, bias=False)
    labels = torch.tensor([[IGNORE, IGNORE, 4, 7, IGNORE, 2, 9, 1, 5],
                           [IGNORE, 3, 3, IGNORE, IGNORE, IGNORE, 12, 0, IGNORE]])  # 6 + 4 = 10 supervised
    return hidden, head, labels


@pytest.mark.parametrize("chunk_rows", [1, 3, 4, 9, 10, 11, None])
def test_selective_loss_equals_the_hand_loss_at_every_chunk_size(case, chunk_rows):
    """10 supervised rows cut into chunks of 1, 3 (a last chunk of one row), 4, 9, 10, 11 rows: the same value and
    the same gradients as cross-entropy over every position's logits."""
    hidden, head, labels = case
    hidden = hidden.clone().requires_grad_(True)
    calls = []
    hook = head.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    loss = selective_cross_entropy(hidden, labels, head, chunk_rows=chunk_rows)
    hook.remove()
    size = chunk_rows or 10
    assert calls == [min(size, 10 - start) for start in range(0, 10, size)]  # the supervised rows, chunk by chunk
    loss.backward()
    reference_hidden = hidden.detach().clone().requires_grad_(True)
    head_grad = head.weight.grad.clone()
    head.weight.grad = None
    expected = hand_loss(head(reference_hidden), labels)
    expected.backward()
    torch.testing.assert_close(loss, expected, **reordered(N, scale_of(expected)))
    torch.testing.assert_close(hidden.grad, reference_hidden.grad, **reordered(N, scale_of(reference_hidden.grad)))
    torch.testing.assert_close(head_grad, head.weight.grad, **reordered(N, scale_of(head.weight.grad)))


def test_selective_loss_divides_by_the_step_count_and_softens_time_tokens(case):
    hidden, head, labels = case
    with torch.no_grad():
        loss = selective_cross_entropy(hidden, labels, head, soft_tokens=[2, 3, 4], std=2.0, num_items_in_batch=torch.tensor(30), chunk_rows=4)
        expected = hand_loss(head(hidden), labels, soft=[2, 3, 4], std=2.0, divide_by=30)
    torch.testing.assert_close(loss, expected, **reordered(N + 3, scale_of(expected)))  # + the soft target's 3 weights


@pytest.mark.parametrize("std", [0.5, 1.0, 2.5])
def test_soft_cross_entropy_at_any_width(case, std):
    """The Gaussian over time tokens has variance std^2 (checked away from std = 1, where std and std^2 agree)."""
    hidden, head, labels = case
    with torch.no_grad():
        logits = head(hidden)
        loss = soft_cross_entropy(logits, labels, [2, 3, 4, 5], std=std)
        expected = hand_loss(logits, labels, soft=[2, 3, 4, 5], std=std)
        torch.testing.assert_close(loss, expected, **reordered(N + 4, scale_of(expected)))  # + the 4 soft weights
        with_count = soft_cross_entropy(logits, labels, [2, 3, 4, 5], std=std, num_items_in_batch=20)
        expected = hand_loss(logits, labels, soft=[2, 3, 4, 5], std=std, divide_by=20)
        torch.testing.assert_close(with_count, expected, **reordered(N + 4, scale_of(expected)))


def test_chunked_loss_keeps_no_logits_for_backward(case):
    """Each chunk runs under checkpointing: no [rows, vocabulary] tensor is saved for backward (the logits are
    recomputed then), only the hidden rows; the loss without chunks would save them."""
    hidden, head, labels = case
    hidden = hidden.clone().requires_grad_(True)
    vocab = head.out_features
    shapes: list[tuple[int, ...]] = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = selective_cross_entropy(hidden, labels, head, chunk_rows=4)
    assert shapes and not any(s and s[-1] == vocab for s in shapes), shapes
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        soft_cross_entropy(head(hidden), labels, [])
    assert any(s and s[-1] == vocab for s in shapes)  # the check can see logits when they are kept
