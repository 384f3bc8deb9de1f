"""The objective interface the loop calls, and the minibatch view it passes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tmpo.distributed import Processes
from tmpo.samplers.rollout import Rollout
from tmpo.sde import KL_FORMS


def check_kl_form(kl_form: str) -> str:
    """``kl_form`` if it is one of :data:`tmpo.sde.KL_FORMS`, else a ValueError naming the options."""
    if kl_form not in KL_FORMS:
        raise ValueError(f"objective.kl_form={kl_form!r} is not a KL form; valid options: {', '.join(KL_FORMS)}")
    return kl_form


@dataclass
class Prepared:
    """Detached per-iteration quantities an objective computes once from rewards and the rollout."""

    leaf_adv: Tensor | None = None  # [L]
    edge_adv: Tensor | None = None  # [E] step-specific advantages (TreeGRPO, step-wise balance)
    kl_leaf_weight: Tensor | None = None  # [L] weights of the KL-to-reference term (None = uniform)
    stats: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Minibatch:
    """A subset of groups: its leaves, its stored edges and the leaf-edge incidence restricted to them."""

    leaf_ids: Tensor  # [l]
    edge_ids: Tensor  # [e]
    path: Tensor  # [l, e]
    edge_is_prior: Tensor  # [e]
    log_prob_old: Tensor  # [e]
    latent_dim: int  # d, to turn per-dim-mean log-probs into sums when asked

    @staticmethod
    def of_leaves(rollout: Rollout, leaf_ids: Tensor) -> "Minibatch":
        """The given leaves (sorted) and every stored edge on their trajectories."""
        leaf_ids = torch.sort(leaf_ids).values
        path = rollout.path[leaf_ids]
        edge_ids = torch.nonzero(path.sum(0) > 0).squeeze(1)
        return Minibatch(
            leaf_ids=leaf_ids,
            edge_ids=edge_ids,
            path=path[:, edge_ids],
            edge_is_prior=rollout.edge_is_prior[edge_ids],
            log_prob_old=rollout.edge_log_prob_old[edge_ids],
            latent_dim=rollout.latent_dim,
        )

    @staticmethod
    def of_groups(rollout: Rollout, groups: Tensor) -> "Minibatch":
        """Whole groups: their leaves and all their stored edges (a tree's shared edges stay together)."""
        return Minibatch.of_leaves(rollout, torch.nonzero(torch.isin(rollout.group, groups)).squeeze(1))


class Objective:
    """Interface: ``prepare`` (once per rollout) and ``loss`` (per minibatch and inner update).

    ``loss`` receives the minibatch's edge log-probs under the current parameters (``log_prob``,
    ``[e]``, differentiable) and the detached RatioNorm bias per edge (``bias``, ``[e]``) and returns a
    scalar to *minimise* plus detached statistics. The KL-to-reference penalty is added by the loop
    (it needs the reference model) with weight ``kl_coef`` and per-leaf weights from ``prepare``.
    """

    kl_coef: float = 0.0
    kl_form: str = "exact"  # units of the KL penalty: "exact" Gaussian KL or "flow_grpo" (tmpo.sde.reference_kl)
    log_prob_reduction: str = "mean"  # "mean" (paper eq. 49) or "sum" over latent dims
    # The processes sharing the batch (set by the loop; alone, every collective is the identity): an objective
    # whose advantages use statistics over the whole batch (not per group) gathers its inputs with
    # processes.gather and keeps its own rows with processes.local.
    processes: Processes = Processes()

    def prepare(
        self, rollout: Rollout, rewards: Tensor, step: int, samples: Tensor | None = None, reward_info: dict | None = None
    ) -> Prepared:
        """Detached advantages (and KL weights) for this rollout. ``samples`` are the decoded leaves and
        ``reward_info`` the reward's side outputs, for objectives that need them (e.g. GARDO)."""
        raise NotImplementedError

    def after_update(self, policy, stats: dict[str, float], step: int) -> dict[str, float]:
        """Hook after the iteration's optimizer steps (e.g. GARDO's reference reset); returns metrics."""
        return {}

    def loss(self, mb: Minibatch, log_prob: Tensor, bias: Tensor, prepared: Prepared) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def log_prob_scale(self, latent_dim: int) -> float:
        """1 for per-dim-mean log-probs (eq. 49), ``d`` to turn them into sums over latent dims."""
        if self.log_prob_reduction == "mean":
            return 1.0
        if self.log_prob_reduction == "sum":
            return float(latent_dim)
        raise ValueError(f"log_prob_reduction must be 'mean' or 'sum', got {self.log_prob_reduction!r}")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but the checkpoint holds {sorted(state)}")
