"""TMPO's Softmax Trajectory Balance objective (paper Sec. 4.1, eqs. 5-7, App. B)."""

from __future__ import annotations

import torch
from torch import Tensor

from tmpo.objectives.advantages import linear_warmup, softmax_tb_advantage, uniform_policy_advantage
from tmpo.objectives.base import Minibatch, Objective, Prepared, check_kl_form
from tmpo.objectives.ppo import clip_fraction, clipped_surrogate
from tmpo.samplers.rollout import Rollout

POLICY_TERMS = ("trajectory", "uniform")


class SoftmaxTBObjective(Objective):
    """``L = -(1/K) sum_i min(w_i A_i, clip(w_i, 1-eps, 1+eps) A_i)`` (eq. 6) with the Softmax-TB advantage.

    Args:
        beta_start, beta_end, beta_warmup_steps: reward temperature, linear warm-up 0.8 -> 2.0 over
            150 steps (App. D.4); ``beta_start == beta_end`` fixes it (Table 2 "beta = 1").
        clip_eps: IS clip range (0.2).
        ratio_norm: centre each per-step log-ratio with the detached ``||mu - mu_old||^2 / (2 std^2)``
            (RatioNorm, App. B.1); the trajectory ratio is ``exp(sum_t log w_hat_t)``, unscaled.
        policy_term: ``"trajectory"`` (paper: ``p = softmax(log P_old)``) or ``"uniform"`` (``p = 1/K``,
            an ablation of the policy term).
        kl_coef: weight of the KL penalty to the reference policy added by the loop (App. D.3 step 6;
            the paper gives no value).
        kl_form: units of that KL (:func:`tmpo.sde.reference_kl`). The paper names no form; we use the
            ``"exact"`` Gaussian KL, the same per-dim density the ratios use. Under the paper's CPS noise
            it equals Flow-GRPO's code form, so ``kl_coef`` means the same as the baselines' there.
        log_prob_reduction: ``"mean"`` over latent dims (eq. 49, default) or ``"sum"`` (true densities).
    """

    def __init__(
        self,
        beta_start: float = 0.8,
        beta_end: float = 2.0,
        beta_warmup_steps: int = 150,
        clip_eps: float = 0.2,
        ratio_norm: bool = True,
        policy_term: str = "trajectory",
        kl_coef: float = 0.0,
        log_prob_reduction: str = "mean",
        kl_form: str = "exact",
    ) -> None:
        if policy_term not in POLICY_TERMS:
            raise ValueError(f"policy_term must be one of {POLICY_TERMS}, got {policy_term!r}")
        self.beta_start, self.beta_end, self.beta_warmup_steps = beta_start, beta_end, beta_warmup_steps
        self.clip_eps = clip_eps
        self.ratio_norm = ratio_norm
        self.policy_term = policy_term
        self.kl_coef = kl_coef
        self.kl_form = check_kl_form(kl_form)
        self.log_prob_reduction = log_prob_reduction

    def beta(self, step: int) -> float:
        return linear_warmup(step, self.beta_start, self.beta_end, self.beta_warmup_steps)

    def prepare(
        self, rollout: Rollout, rewards: Tensor, step: int, samples: Tensor | None = None, reward_info: dict | None = None
    ) -> Prepared:
        g, k = rollout.num_groups, rollout.group_size
        beta = self.beta(step)
        r = rewards.view(g, k)
        if self.policy_term == "uniform":
            adv = uniform_policy_advantage(r, beta)
        else:
            log_p = rollout.trajectory_log_prob_old().view(g, k) * self.log_prob_scale(rollout.latent_dim)
            adv = softmax_tb_advantage(r, log_p, beta)
        return Prepared(leaf_adv=adv.reshape(-1), stats={"beta": torch.tensor(beta)})

    def loss(self, mb: Minibatch, log_prob: Tensor, bias: Tensor, prepared: Prepared) -> tuple[Tensor, dict[str, Tensor]]:
        scale = self.log_prob_scale(mb.latent_dim)
        log_w_edge = (log_prob - mb.log_prob_old + (bias if self.ratio_norm else 0.0)) * scale
        log_w = mb.path @ log_w_edge  # [l] trajectory-level log ratio, sum over the T stochastic steps
        ratio = torch.exp(log_w)
        adv = prepared.leaf_adv[mb.leaf_ids]
        loss = -clipped_surrogate(ratio, adv, self.clip_eps).mean()
        return loss, {
            "ratio_mean": ratio.detach().mean(),
            "clip_frac": clip_fraction(ratio, self.clip_eps),
            "log_ratio_absmax": log_w.detach().abs().max(),
        }
