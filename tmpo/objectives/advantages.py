"""Advantage functions: pure, detached, operating on ``[G, K]`` groups (last dim = group members)."""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_tb_advantage(rewards: Tensor, log_probs: Tensor, beta: float) -> Tensor:
    """Softmax Trajectory Balance advantage (paper eqs. 5 and 7).

    ``A_i = log softmax(beta R)_i - log softmax(log P)_i`` over the last dim, where ``log P`` is the
    rollout-time trajectory log-probability (sum over stochastic steps, eq. 47). Detached: the paper
    routes the gradient only through the importance ratio (eq. 6, ``A^⊥``).
    """
    if rewards.shape != log_probs.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and log_probs {tuple(log_probs.shape)} must have the same shape")
    log_q = torch.log_softmax(beta * rewards.detach().double(), dim=-1)
    log_p = torch.log_softmax(log_probs.detach().double(), dim=-1)
    return (log_q - log_p).to(rewards.dtype)


def uniform_policy_advantage(rewards: Tensor, beta: float) -> Tensor:
    """Softmax-TB advantage with the policy term replaced by ``p_i = 1/K``: ``log softmax(beta R)_i + log K``.

    Ablation of the policy term (science issue): isolates what ``log p`` contributes.
    """
    k = rewards.shape[-1]
    return (torch.log_softmax(beta * rewards.detach().double(), dim=-1) + torch.log(torch.tensor(float(k)))).to(rewards.dtype)


def group_zscore(rewards: Tensor, eps: float = 1e-4, global_std: bool = False, unbiased: bool = False) -> Tensor:
    """GRPO advantage ``(R_i - mean_group) / (std + eps)`` (paper eq. 28; Flow-GRPO ``stat_tracking``).

    The mean is always per group. ``global_std=True`` divides by the std over all groups together
    (Flow-GRPO's ``global_std`` option); otherwise by each group's own std. ``unbiased`` picks the
    ``K - 1`` denominator (MixGRPO uses ``torch.std``'s unbiased default; Flow-GRPO uses numpy's biased one).
    """
    r = rewards.detach()
    centred = r - r.mean(dim=-1, keepdim=True)
    std = r.std(unbiased=unbiased) if global_std else r.std(dim=-1, keepdim=True, unbiased=unbiased)
    return centred / (std + eps)


def linear_warmup(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear schedule from ``start`` to ``end`` over ``warmup_steps``, constant afterwards (paper App. D.4)."""
    if warmup_steps <= 0:
        return float(end)
    frac = min(max(step / warmup_steps, 0.0), 1.0)
    return float(start + (end - start) * frac)


def sibling_log_softmax(scores: Tensor, parent: Tensor) -> Tensor:
    """``log softmax`` of ``scores`` within each group of tree edges sharing a parent state, ``[E]`` float64."""
    s = scores.double()
    n = int(parent.max()) + 1
    m = torch.full((n,), -torch.inf, dtype=torch.float64).scatter_reduce(0, parent, s, reduce="amax")
    z = torch.zeros(n, dtype=torch.float64).index_add_(0, parent, torch.exp(s - m[parent]))
    return s - m[parent] - torch.log(z[parent])
