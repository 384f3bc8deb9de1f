"""PPO-style clipped surrogate (paper eq. 6; Schulman et al. 2017)."""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(ratio: Tensor, advantage: Tensor, eps: float) -> Tensor:
    """``min(w A, clip(w, 1-eps, 1+eps) A)`` elementwise (to be *maximised*).

    Gradient cases (paper App. B.3): inside the trust region both branches agree; a beneficial
    over-update (``A > 0, w > 1+eps`` or ``A < 0, w < 1-eps``) selects the constant clipped branch and
    stops the gradient; a harmful deviation selects the unclipped branch and keeps the corrective gradient.
    """
    return torch.minimum(ratio * advantage, torch.clamp(ratio, 1.0 - eps, 1.0 + eps) * advantage)


def clip_fraction(ratio: Tensor, eps: float) -> Tensor:
    """Share of ratios outside ``[1-eps, 1+eps]`` (a detached statistic)."""
    return ((ratio.detach() - 1.0).abs() > eps).float().mean()
