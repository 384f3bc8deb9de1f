"""Step-wise (detailed) balance: the per-transition counterpart of Softmax-TB (paper Table 2 ablation).

Detailed balance asks every transition to match a flow ratio, ``F(s) P_F(s'|s) = F(s') P_B(s|s')``; on
a tree (``P_B = 1``) and normalised among the B children of one parent this becomes a per-step
Softmax-TB: ``p_e = softmax_siblings(log pi_old(e))`` should match ``q_e = softmax_siblings(log F(child_e))``.
It needs the intractable state flow ``F``. Our estimator (the paper does not specify one): the
Monte-Carlo Boltzmann flow of the sampled subtree, ``log F(child) = log mean_{leaves l under child}
exp(beta R_l)``, which is exact for the sampled leaves and needs no extra network. Each stored edge then
gets ``A_e = log q_e - log p_e`` and its own RatioNorm-centred per-step ratio in the PPO clip.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tmpo.objectives.advantages import linear_warmup, sibling_log_softmax
from tmpo.objectives.base import Prepared
from tmpo.objectives.grpo import GRPOObjective
from tmpo.samplers.rollout import Rollout


def subtree_log_flow(path: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """``log F(child_e) = log mean_{l under e} exp(beta R_l)`` for every edge, ``[E]``."""
    p = path.double()
    br = beta * rewards.double()
    m = br.max()
    total = (p * torch.exp(br - m)[:, None]).sum(0)
    return torch.log(total / p.sum(0)) + m


class StepwiseBalanceObjective(GRPOObjective):
    """Per-edge Softmax balance with the subtree Monte-Carlo state flow (see module docstring).

    Shares TMPO's beta warm-up, clip range, RatioNorm and KL; only the credit assignment differs.
    """

    def __init__(
        self, beta_start: float = 0.8, beta_end: float = 2.0, beta_warmup_steps: int = 150, clip_eps: float = 0.2,
        kl_coef: float = 0.0, ratio_norm: bool = True, log_prob_reduction: str = "mean", kl_form: str = "exact",
    ) -> None:
        super().__init__(clip_eps=clip_eps, kl_coef=kl_coef, ratio_norm=ratio_norm, log_prob_reduction=log_prob_reduction,
                         kl_form=kl_form)
        self.beta_start, self.beta_end, self.beta_warmup_steps = beta_start, beta_end, beta_warmup_steps

    def prepare(
        self, rollout: Rollout, rewards: Tensor, step: int, samples: Tensor | None = None, reward_info: dict | None = None
    ) -> Prepared:
        beta = linear_warmup(step, self.beta_start, self.beta_end, self.beta_warmup_steps)
        scale = self.log_prob_scale(rollout.latent_dim)
        log_q = sibling_log_softmax(subtree_log_flow(rollout.path, rewards, beta), rollout.edge_parent)
        log_p = sibling_log_softmax(rollout.edge_log_prob_old * scale, rollout.edge_parent)
        edge_adv = (log_q - log_p).to(rewards.dtype)
        # a leaf-level view for logging: the mean advantage along each leaf's path
        leaf_adv = (rollout.path @ edge_adv) / rollout.path.sum(1)
        return Prepared(leaf_adv=leaf_adv, edge_adv=edge_adv, stats={"beta": torch.tensor(beta)})
