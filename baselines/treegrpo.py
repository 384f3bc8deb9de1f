"""TreeGRPO (Ding & Ye, ICLR 2026): window-tree rollouts and advantages propagated up the tree.

Reconstructed from the paper's abstract, project page and README (no source code was public, see
``shared/specs/baselines.md`` §3): one shared x_T per tree, ODE outside a window of ``w`` consecutive
SDE steps, every node branching ``k`` ways at each window step (``k^w`` leaves; 3^3 = 27 here), the
window sliding MixGRPO-style. Leaf advantages are z-scored within the tree group; an edge's advantage
is its child's aggregate, the average of the grandchildren's aggregates weighted by their sibling
transition probabilities (``weighting="logp"``: softmax of the old log-probs among siblings) or a
plain mean (``weighting="uniform"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from baselines.mixgrpo import window_start
from tmpo.objectives.advantages import sibling_log_softmax
from tmpo.objectives.base import Prepared
from tmpo.objectives.grpo import GRPOObjective
from tmpo.samplers.plans import Plan, RolloutPlan, StepPlan
from tmpo.samplers.rollout import Rollout


@dataclass
class TreeWindowPlan(Plan):
    """``window`` consecutive SDE steps, each branching ``branch`` ways; the window slides like MixGRPO's
    (``shift_every`` iterations per ``shift``) and never includes the last step (zero noise under CPS)."""

    branch: int = 3
    window: int = 3
    shift_every: int = 25
    shift: int = 1

    def make(self, step: int, total_steps: int, num_steps: int, rng: np.random.Generator) -> RolloutPlan:
        starts = num_steps - self.window  # 1-based window starts 1..N-w keep the last step out
        if starts < 1:
            raise ValueError(f"a window of {self.window} branch steps needs more than {self.window} denoising steps")
        first = window_start(step, starts, self.shift_every, self.shift) + 1
        win = range(first, first + self.window)
        steps = [StepPlan(stochastic=True, branch=self.branch, store=True) if s in win else StepPlan() for s in range(1, num_steps + 1)]
        return RolloutPlan(n_roots=1, steps=tuple(steps))


def sibling_log_weights(edge_parent: Tensor, log_prob_old: Tensor, weighting: str) -> Tensor:
    """``log w_e`` with ``w`` normalised over siblings (edges sharing a parent state), ``[E]``."""
    if weighting not in ("logp", "uniform"):
        raise ValueError(f"weighting must be 'logp' or 'uniform', got {weighting!r}")
    scores = log_prob_old if weighting == "logp" else torch.zeros_like(log_prob_old)
    return sibling_log_softmax(scores, edge_parent)


def propagate_tree_advantages(path: Tensor, edge_step: Tensor, log_w: Tensor, leaf_adv: Tensor) -> Tensor:
    """Edge advantages: ``A_e = sum_{leaves l under e} (prod of w over l's edges below e) A_l``, ``[E]``.

    This is the recursive "weighted average of the children's aggregates" written in closed form;
    the weights of the leaves under an edge sum to 1.
    """
    p = path.double()
    later = (edge_step[None, :] > edge_step[:, None]).double()  # [E, E']: e' strictly after e
    # log weight of leaf l seen from edge e: sum of log w over l's edges after e
    lw = (p * log_w[None, :]) @ later.T  # [L, E]
    return ((p * torch.exp(lw)) * leaf_adv.double()[:, None]).sum(0).to(leaf_adv.dtype)


class TreeGRPOObjective(GRPOObjective):
    """GRPO clip over every window edge with its own propagated advantage."""

    def __init__(self, weighting: str = "logp", **grpo_kwargs) -> None:
        super().__init__(**grpo_kwargs)
        self.weighting = weighting

    def prepare(
        self, rollout: Rollout, rewards: Tensor, step: int, samples: Tensor | None = None, reward_info: dict | None = None
    ) -> Prepared:
        leaf_adv = self.leaf_advantages(rewards.view(rollout.num_groups, rollout.group_size)).reshape(-1)
        log_w = sibling_log_weights(rollout.edge_parent, rollout.edge_log_prob_old, self.weighting)
        edge_step = rollout.parent_step[rollout.edge_parent]
        edge_adv = propagate_tree_advantages(rollout.path, edge_step, log_w, leaf_adv)
        return Prepared(leaf_adv=leaf_adv, edge_adv=edge_adv)
