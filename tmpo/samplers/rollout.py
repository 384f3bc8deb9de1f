"""The typed container a sampler hands to the objective: leaves, stored transitions, tree paths."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """Everything needed to score leaves and to recompute every stored transition's log-prob.

    Shapes: ``G`` prompts (groups), ``K`` leaves per group, ``L = G*K`` leaves, ``P`` stored parent
    states, ``E`` stored edges (transitions), ``*S`` the latent shape. Leaves are ordered by group.
    A tree edge is stored once however many leaves share it (a 3/9/27 tree stores 39 edges, not 81)
    and siblings share one parent record, so a recompute costs one model call per parent.

    Prior parents (``parent_is_prior``) stand for the N(0, I) draw of independent initial noises:
    mean 0, std 1, no model call, no dependence on theta.
    """

    prompts: list[str]  # [G]
    metadata: list[dict]  # [G]
    cond: Any  # the policy's encoded prompts for the G groups (opaque to the sampler)
    leaves: Tensor  # [L, *S] final latents
    group: Tensor  # [L] long
    group_size: int  # K
    parent_x: Tensor  # [P, *S]
    parent_sigma: Tensor  # [P]
    parent_sigma_next: Tensor  # [P]
    parent_step: Tensor  # [P] long, 1-based denoising step (0 for prior parents)
    parent_group: Tensor  # [P] long
    parent_mean_old: Tensor  # [P, *S] transition mean under the rollout policy
    parent_std: Tensor  # [P]
    parent_is_prior: Tensor  # [P] bool
    edge_parent: Tensor  # [E] long
    edge_x_next: Tensor  # [E, *S]
    edge_log_prob_old: Tensor  # [E] per-dim log-density at rollout time (eq. 49)
    path: Tensor  # [L, E] float 0/1: edge e lies on leaf l's trajectory
    eta: float
    noise: str
    nfe: int  # velocity evaluations per prompt during the rollout
    info: dict = field(default_factory=dict)
    # [L] float64 log p_old(x_0 | prompt) in nats, the marginal density of each leaf under the rollout
    # policy (probability-flow ODE, tmpo.likelihood); only with sampler.leaf_likelihood, else None
    leaf_log_density: Tensor | None = None

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    @property
    def latent_dim(self) -> int:
        return int(self.leaves[0].numel())

    @property
    def edge_is_prior(self) -> Tensor:
        return self.parent_is_prior[self.edge_parent]

    @property
    def edge_group(self) -> Tensor:
        return self.parent_group[self.edge_parent]

    def trajectory_log_prob_old(self) -> Tensor:
        """``log P_old(tau)`` per leaf: the sum of its stored edges' log-probs (paper eq. 47), ``[L]``."""
        return self.path @ self.edge_log_prob_old

    def to(self, device: torch.device | str) -> "Rollout":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, Tensor):
                kw[k] = v.to(device)
        return Rollout(**kw)
