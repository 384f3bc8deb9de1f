"""TMPO's Softmax Trajectory Balance objective (paper Sec. 4.1, eqs. 5-7, App. B)."""

from __future__ import annotations

import torch
from torch import Tensor

from tmpo.diagnostics import group_diagnostics
from tmpo.objectives.advantages import linear_warmup, softmax_tb_advantage, uniform_policy_advantage
from tmpo.objectives.base import Minibatch, Objective, Prepared, check_kl_form
from tmpo.objectives.ppo import clip_fraction, clipped_surrogate
from tmpo.samplers.rollout import Rollout

POLICY_TERMS = ("trajectory", "uniform", "marginal")
MARGINAL_REDUCTIONS = ("sum", "mean")


class SoftmaxTBObjective(Objective):
    """``L = -(1/K) sum_i min(w_i A_i, clip(w_i, 1-eps, 1+eps) A_i)`` (eq. 6) with the Softmax-TB advantage.

    Args:
        beta_start, beta_end, beta_warmup_steps: reward temperature, linear warm-up 0.8 -> 2.0 over
            150 steps (App. D.4); ``beta_start == beta_end`` fixes it (Table 2 "beta = 1").
        clip_eps: IS clip range (0.2).
        ratio_norm: centre each per-step log-ratio with the detached ``||mu - mu_old||^2 / (2 std^2)``
            (RatioNorm, App. B.1); the trajectory ratio is ``exp(sum_t log w_hat_t)``, unscaled.
        policy_term: ``"trajectory"`` (paper: ``p = softmax(log P_old)``), ``"uniform"`` (``p = 1/K``,
            an ablation of the policy term) or ``"marginal"`` (``p = softmax(log p_old(x_0 | prompt))``, the
            model's density of each leaf, App. A.2's ``P_theta(tau_i)`` read as the density of the sample;
            needs ``sampler.leaf_likelihood``, which stores it on the rollout).
        marginal_reduction: units of that density: ``"sum"`` (nats, the true density, default) or
            ``"mean"`` (divided by the latent dim ``d``, the per-dim convention of eq. 49).
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
        marginal_reduction: str = "sum",
    ) -> None:
        if policy_term not in POLICY_TERMS:
            raise ValueError(f"policy_term must be one of {POLICY_TERMS}, got {policy_term!r}")
        if marginal_reduction not in MARGINAL_REDUCTIONS:
            raise ValueError(f"objective.marginal_reduction must be one of {MARGINAL_REDUCTIONS}, got {marginal_reduction!r}")
        self.marginal_reduction = marginal_reduction
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
        stats = {"beta": torch.tensor(beta)}
        if self.policy_term == "uniform":
            adv = uniform_policy_advantage(r, beta)
        elif self.policy_term == "marginal":
            log_p = self.marginal_log_density(rollout).view(g, k)
            adv = softmax_tb_advantage(r, log_p, beta)
            stats.update(marginal_stats(rollout, r, log_p, adv))
        else:
            log_p = rollout.trajectory_log_prob_old().view(g, k) * self.log_prob_scale(rollout.latent_dim)
            adv = softmax_tb_advantage(r, log_p, beta)
        return Prepared(leaf_adv=adv.reshape(-1), stats=stats)

    def marginal_log_density(self, rollout: Rollout) -> Tensor:
        """Each leaf's ``log p_old(x_0 | prompt)`` from the rollout, in ``marginal_reduction`` units, ``[L]``."""
        if rollout.leaf_log_density is None:
            raise ValueError(
                "objective.policy_term=marginal needs each leaf's log p_old(x_0) on the rollout, and this sampler did not "
                "compute it: set sampler.leaf_likelihood on the command line (e.g. '+sampler.leaf_likelihood={ode_steps: 32, "
                "probes: 1, exact: auto}') or use method=tmpo_marginal, which sets it"
            )
        scale = 1.0 / rollout.latent_dim if self.marginal_reduction == "mean" else 1.0
        return rollout.leaf_log_density * scale

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


def marginal_stats(rollout: Rollout, rewards: Tensor, log_p: Tensor, adv: Tensor) -> dict[str, Tensor]:
    """Diagnostics of the marginal policy term on ``[G, K]`` groups (logged as ``train/marginal_*``; the
    loop's ``diag/*`` describe the trajectory term), plus the likelihood's network evaluations per leaf
    (its seconds are part of ``time/rollout_s``)."""
    diag = group_diagnostics(rewards, log_p, adv)
    out = {f"marginal_{n}": torch.tensor(v) for n, v in diag.items() if n != "adv_var_from_log_q"}
    if "leaf_likelihood_evals_per_leaf" in rollout.info:
        out["leaf_likelihood_evals_per_leaf"] = torch.tensor(float(rollout.info["leaf_likelihood_evals_per_leaf"]))
    return out
