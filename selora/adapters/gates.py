"""Block gates: the straight-through indicator I(s >= tau), a block budget, and the penalties."""

from __future__ import annotations

import torch


class _StraightThroughIndicator(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None  # identity gradient to the scores


def active_mask(scores: torch.Tensor, tau: float, max_active: int | None = None) -> torch.Tensor:
    """Boolean mask of open gates: score >= tau and, with a budget, among the top-k scores."""
    mask = scores.detach() >= tau
    if max_active is not None and int(mask.sum()) > max_active:
        top = torch.topk(scores.detach().masked_fill(~mask, float("-inf")), max_active).indices
        mask = torch.zeros_like(mask)
        mask[top] = True
    return mask


def gate_values(scores: torch.Tensor, tau: float, max_active: int | None = None) -> torch.Tensor:
    """Hard 0/1 gates in the forward pass, identity gradient to ``scores`` in the backward pass."""
    return _StraightThroughIndicator.apply(scores, active_mask(scores, tau, max_active))


def score_penalty(scores: torch.Tensor, kind: str, lam: float, tau: float) -> torch.Tensor:
    """The sparsity regularizer added to the task loss (paper eq. 4 and §4.5)."""
    if kind == "l1":
        return lam * scores.abs().sum()
    if kind == "l2":
        return lam * scores.pow(2).sum()
    if kind == "hinge":
        return lam * (scores - tau).clamp(min=0).sum()
    raise ValueError(f"unknown regularizer {kind!r}")
