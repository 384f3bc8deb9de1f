"""GARDO (He et al. 2025, arXiv 2512.24138): Flow-GRPO plus diversity-aware advantages, a gated
(selective) KL and an adaptive reference reset. Read from tinnerhrhe/GARDO (see
``shared/specs/baselines.md`` §4); the rollout, step and loss are the shared core's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from tmpo.objectives.base import Prepared
from tmpo.objectives.grpo import GRPOObjective
from tmpo.samplers.rollout import Rollout


def nearest_neighbour_distance(features: Tensor) -> Tensor:
    """Cosine distance of each sample to its nearest other group member: ``[G, K, D] -> [G, K]``."""
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    dist = 1.0 - f @ f.transpose(-1, -2)
    eye = torch.eye(f.shape[-2], dtype=torch.bool)
    return dist.masked_fill(eye, torch.inf).min(dim=-1).values


def diversity_advantage(rewards: Tensor, nn_dist: Tensor, zscore: bool = False, std_eps: float = 1e-4) -> Tensor:
    """``A_i = c_i * w_i``, ``w_i = d_i / mean(d)`` for above-average samples, else 1.

    ``[G, K]`` in and out. Only samples at or above the group's mean reward are amplified by how far
    they are from their nearest neighbour (GARDO ``stat_tracking`` ``type='gardo'``). ``c_i`` is
    ``r_i - mean r`` (GARDO's code: no std) or, with ``zscore=True``, the z-score
    ``(r_i - mean r) / (std + std_eps)`` (the TMPO paper's comparison, App. D.5: "all GRPO-based methods
    use z-score advantage normalization").
    """
    r = rewards.double()
    mean_r = r.mean(-1, keepdim=True)
    w = torch.where(r >= mean_r, nn_dist / nn_dist.mean(-1, keepdim=True), torch.ones_like(r))
    centred = r - mean_r
    if zscore:
        centred = centred / (r.std(-1, keepdim=True, unbiased=False) + std_eps)
    return (centred * w).to(rewards.dtype)


def descending_ranks(x: Tensor) -> Tensor:
    """Rank 1 = largest value (ordinal ranks; ties broken by position)."""
    order = torch.argsort(-x.double(), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, x.numel() + 1)
    return ranks.double()


def uncertainty(main: Tensor, aux: list[Tensor], sign: float = 1.0) -> Tensor:
    """``u_i = sign * (rank_main - mean_aux rank)`` over the whole batch (GARDO code: sign = +1).

    With ``sign = +1`` (the code) ``u > 0`` means the proxy reward ranks the sample *worse* than the
    auxiliary models do; ``sign = -1`` flags samples the proxy over-rates (the usual hacking reading).
    """
    if not aux:
        raise ValueError("GARDO's uncertainty gate needs auxiliary rewards (reward info 'aux'); use kl_gate=all")
    return sign * (descending_ranks(main) - torch.stack([descending_ranks(a) for a in aux]).mean(0))


class RiskCompensator:
    """Adaptive flagged fraction ``b``: x1.1 when the batch's mean non-negative ``u`` exceeds the max of the
    last ``history`` batch means, x0.9 when below their min; clipped to ``[b_min, b_max]``."""

    def __init__(self, b: float = 0.1, history: int = 20, b_min: float = 0.02, b_max: float = 0.2) -> None:
        self.b, self.history, self.b_min, self.b_max = b, history, b_min, b_max
        self.means: list[float] = []

    def update(self, u: Tensor) -> float:
        pos = u[u >= 0]
        m = float(pos.mean()) if pos.numel() else 0.0
        if self.means:
            if m > max(self.means):
                self.b *= 1.1
            elif m < min(self.means):
                self.b *= 0.9
        self.b = float(np.clip(self.b, self.b_min, self.b_max))
        self.means = (self.means + [m])[-self.history :]
        return self.b


def gate_flags(u: Tensor, b: float) -> Tensor:
    """Flag samples whose ``u`` exceeds the ``(100 - 100 b)``-th percentile of the non-negative ``u``."""
    pos = u[u >= 0]
    if pos.numel() == 0:
        return torch.zeros_like(u, dtype=torch.bool)
    thr = np.percentile(pos.numpy(), 100.0 - 100.0 * b)
    return u > float(thr)


class GARDOObjective(GRPOObjective):
    """Flow-GRPO clip loss with GARDO's advantage, gated KL and reference reset.

    Args:
        features: extractor ``samples -> [N, D]`` for the diversity weights (DINOv2 in the TMPO paper,
            DINOv3 in GARDO's code; the toy uses the raw points).
        aux_rewards: auxiliary reward models scored on the samples for the uncertainty gate (GARDO:
            aesthetic + ImageReward); if None, ``reward_info["aux"]`` from the reward is used.
        kl_gate: ``"uncertainty"`` (KL only on flagged samples; needs auxiliary rewards) or
            ``"all"`` (plain KL on every sample, for rewards without auxiliary models such as the toy).
        uncertainty_sign: +1 as GARDO's code, -1 to flag samples the proxy over-rates.
        kl_thres: reset the reference when an optimizer step's KL exceeded this (3e-4 in GARDO; per task).
            Compared, as GARDO's code does, with the KL averaged over *all* samples and trained steps
            (zeros for samples the gate left out) in the objective's ``kl_form`` units (Flow-GRPO's by
            default). GARDO's code averages over flagged samples within each micro-batch of a few
            samples and over micro-batches; we read it with micro-batches of one sample.
        reset_every: reset anyway after this many iterations without one (hard-coded 15 in the code).
        zscore: divide the centred reward by the group std before the diversity weight (TMPO paper
            App. D.5, default) or not (GARDO's code).
    """

    def __init__(
        self,
        features: Callable[[Tensor], Tensor],
        aux_rewards: dict[str, Callable] | None = None,
        kl_gate: str = "uncertainty",
        uncertainty_sign: float = 1.0,
        kl_thres: float = 3e-4,
        reset_every: int = 15,
        zscore: bool = True,
        **grpo_kwargs,
    ) -> None:
        super().__init__(**grpo_kwargs)
        if kl_gate not in ("uncertainty", "all"):
            raise ValueError(f"kl_gate must be 'uncertainty' or 'all', got {kl_gate!r}")
        self.features, self.kl_gate, self.uncertainty_sign = features, kl_gate, uncertainty_sign
        self.aux_rewards = dict(aux_rewards or {})
        self.kl_thres, self.reset_every, self.zscore = kl_thres, reset_every, zscore
        self.compensator = RiskCompensator()
        self.since_reset = 0
        self.resets = 0

    def prepare(
        self, rollout: Rollout, rewards: Tensor, step: int, samples: Tensor | None = None, reward_info: dict | None = None
    ) -> Prepared:
        if samples is None:
            raise ValueError("GARDO needs the decoded samples for its diversity weights")
        g, k = rollout.num_groups, rollout.group_size
        feats = self.features(samples).view(g, k, -1)
        adv = diversity_advantage(rewards.view(g, k), nearest_neighbour_distance(feats), self.zscore, self.std_eps)
        adv = adv.clamp(-self.adv_clip, self.adv_clip)
        stats: dict[str, Tensor] = {}
        kl_w = None
        if self.kl_gate == "uncertainty":
            aux = self._aux_scores(rollout, samples) or list((reward_info or {}).get("aux", {}).values())
            every = self.processes.gather  # ranks over the whole batch: every process's leaves
            u = uncertainty(every(rewards), [every(torch.as_tensor(a)) for a in aux], self.uncertainty_sign)
            b = self.compensator.update(u)
            flags = gate_flags(u, b)
            kl_w = self.processes.local(flags.to(rewards.dtype))
            stats = {"gardo_b": torch.tensor(b), "gardo_flagged": flags.float().mean()}
        return Prepared(leaf_adv=adv.reshape(-1), kl_leaf_weight=kl_w, stats=stats)

    def _aux_scores(self, rollout: Rollout, samples: Tensor) -> list[Tensor]:
        k = rollout.group_size
        prompts = [p for p in rollout.prompts for _ in range(k)]
        meta = [m for m in rollout.metadata for _ in range(k)]
        return [torch.as_tensor(fn(samples, prompts, meta)[0]).float() for fn in self.aux_rewards.values()]

    def after_update(self, policy, stats: dict[str, float], step: int) -> dict[str, float]:
        """Reset the reference to the live policy when an optimizer step's all-sample KL
        (``kl_ref_all_max``, see ``kl_thres``) exceeded the threshold, or after ``reset_every`` iterations."""
        self.since_reset += 1
        reset = stats.get("kl_ref_all_max", 0.0) > self.kl_thres or self.since_reset > self.reset_every
        if reset:
            policy.reset_reference()
            self.since_reset = 0
            self.resets += 1
        return {"gardo_reference_reset": float(reset), "reference_resets": float(self.resets)}

    def state_dict(self) -> dict:
        return {"b": self.compensator.b, "means": list(self.compensator.means), "since_reset": self.since_reset,
                "resets": self.resets}

    def load_state_dict(self, state: dict) -> None:
        self.compensator.b, self.compensator.means = state["b"], list(state["means"])
        self.since_reset = state["since_reset"]
        self.resets = int(state.get("resets", 0))
