"""Per-iteration diagnostics of what drives the advantage (logged for every method).

They test the science question: at rollout time the trajectory log-probs of siblings differ only by
noise norms, so is ``p = softmax(log P)`` informative at all?
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _within_group_corr(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per group (last dim), NaN where either side is constant, ``[G]``."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    den = (a.pow(2).sum(-1) * b.pow(2).sum(-1)).sqrt()
    return torch.where(den > 1e-12, (a * b).sum(-1) / den.clamp(min=1e-300), torch.full_like(den, float("nan")))


def _nanmean(x: Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else float("nan")


def group_diagnostics(rewards: Tensor, log_p_traj: Tensor, adv: Tensor) -> dict[str, float]:
    """Diagnostics on ``[G, K]`` groups.

    * ``p_entropy_frac``: ``H(softmax(log P)) / log K`` (1 = uniform p, 0 = one trajectory has it all);
    * ``logp_spread``: within-group std of ``log P(tau)``;
    * ``corr_logp_reward``: within-group correlation of ``log p`` with the reward;
    * ``adv_var_from_log_q``: share of the advantage's within-group variance explained by ``log q``
      alone (R^2 of a linear fit of A on log q = beta R + c, i.e. ``corr(A, R)^2``): 1 for GRPO's
      z-scores, < 1 when the policy term adds something.
    """
    k = rewards.shape[-1]
    log_p = torch.log_softmax(log_p_traj.double(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return {
        "p_entropy_frac": float(entropy.mean() / math.log(k)) if k > 1 else float("nan"),
        "logp_spread": float(log_p_traj.double().std(dim=-1, unbiased=False).mean()),
        "corr_logp_reward": _nanmean(_within_group_corr(log_p, rewards)),
        "adv_var_from_log_q": _nanmean(_within_group_corr(adv, rewards) ** 2),
    }
