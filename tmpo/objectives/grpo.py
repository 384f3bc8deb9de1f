"""GRPO-style reward maximisation with per-step clipped ratios (Flow-GRPO; paper App. A.3 eq. 28)."""

from __future__ import annotations

import torch
from torch import Tensor

from tmpo.objectives.advantages import group_zscore
from tmpo.objectives.base import Minibatch, Objective, Prepared, check_kl_form
from tmpo.objectives.ppo import clip_fraction, clipped_surrogate
from tmpo.samplers.rollout import Rollout


class GRPOObjective(Objective):
    """Per-step PPO clip with a z-scored group advantage; KL to the reference added by the loop.

    Each (leaf, stored step) pair contributes ``min(r_t A, clip(r_t) A)`` with the per-step ratio
    ``r_t = exp(log pi_theta - log pi_old)``; the loss is minus their mean (Flow-GRPO averages over
    trained timesteps and samples). If ``prepare`` provides step-specific ``edge_adv`` (TreeGRPO,
    step-wise balance), each stored edge is one term with its own advantage instead. Prior edges
    (initial-noise draws) carry no parameters and are left out.

    Args:
        clip_eps: clip range (TMPO paper App. D.5 comparison setting: 0.2; Flow-GRPO's code uses 1e-4).
        kl_coef: KL-to-reference coefficient (0.03 in the paper's comparisons).
        kl_form: units of the KL (:func:`tmpo.sde.reference_kl`): ``"flow_grpo"`` (default, the form its
            ``kl_coef`` was tuned for: no ``|dt|`` under ``noise=sde``) or ``"exact"``.
        global_std: divide by the std over the whole batch instead of each group's (Flow-GRPO option).
        adv_clip: clamp advantages to ``[-adv_clip, adv_clip]`` (Flow-GRPO: 5).
        std_eps: added to the std (Flow-GRPO: 1e-4; MixGRPO: 1e-8).
        unbiased_std: ``K - 1`` std denominator (MixGRPO's ``torch.std``) instead of ``K`` (Flow-GRPO's numpy).
        ratio_norm: centre each per-step log-ratio with RatioNorm (off for GRPO baselines).
    """

    def __init__(
        self,
        clip_eps: float = 0.2,
        kl_coef: float = 0.03,
        global_std: bool = False,
        adv_clip: float = 5.0,
        std_eps: float = 1e-4,
        unbiased_std: bool = False,
        ratio_norm: bool = False,
        log_prob_reduction: str = "mean",
        kl_form: str = "flow_grpo",
    ) -> None:
        self.clip_eps = clip_eps
        self.kl_coef = kl_coef
        self.kl_form = check_kl_form(kl_form)
        self.global_std = global_std
        self.adv_clip = adv_clip
        self.std_eps = std_eps
        self.unbiased_std = unbiased_std
        self.ratio_norm = ratio_norm
        self.log_prob_reduction = log_prob_reduction

    def leaf_advantages(self, rewards: Tensor) -> Tensor:
        """``[G, K]`` rewards to clamped z-scored advantages (``global_std``: the std of the whole batch,
        gathered over processes when several share it)."""
        if self.global_std:
            every = self.processes.gather(rewards)
            adv = self.processes.local(group_zscore(every, eps=self.std_eps, global_std=True, unbiased=self.unbiased_std))
        else:
            adv = group_zscore(rewards, eps=self.std_eps, global_std=False, unbiased=self.unbiased_std)
        return adv.clamp(-self.adv_clip, self.adv_clip)

    def prepare(
        self, rollout: Rollout, rewards: Tensor, step: int, samples: Tensor | None = None, reward_info: dict | None = None
    ) -> Prepared:
        adv = self.leaf_advantages(rewards.view(rollout.num_groups, rollout.group_size))
        return Prepared(leaf_adv=adv.reshape(-1))

    def loss(self, mb: Minibatch, log_prob: Tensor, bias: Tensor, prepared: Prepared) -> tuple[Tensor, dict[str, Tensor]]:
        log_r = (log_prob - mb.log_prob_old + (bias if self.ratio_norm else 0.0)) * self.log_prob_scale(mb.latent_dim)
        trainable = ~mb.edge_is_prior
        if prepared.edge_adv is not None:
            edge_idx = torch.nonzero(trainable).squeeze(1)
            adv = prepared.edge_adv[mb.edge_ids[edge_idx]]
        else:
            leaf_idx, edge_idx = torch.nonzero((mb.path > 0) & trainable[None, :], as_tuple=True)
            adv = prepared.leaf_adv[mb.leaf_ids[leaf_idx]]
        ratio = torch.exp(log_r[edge_idx])
        loss = -clipped_surrogate(ratio, adv, self.clip_eps).mean()
        return loss, {
            "ratio_mean": ratio.detach().mean(),
            "clip_frac": clip_fraction(ratio, self.clip_eps),
            "log_ratio_absmax": log_r[edge_idx].detach().abs().max(),
        }
