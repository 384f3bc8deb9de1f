"""Rollout plans: which denoising steps are stochastic, where the rollout branches, what is stored.

A plan is the only thing that differs between TMPO's dynamic tree, Flow-GRPO's independent
trajectories, MixGRPO's sliding SDE window and TreeGRPO's window tree: the executor
(:class:`tmpo.samplers.sampler.FlowSampler`) runs any plan the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tmpo.samplers.branching import resolve_positions, sample_branch_positions


@dataclass(frozen=True)
class StepPlan:
    """What happens at one denoising step (1-based; step s goes from sigma[s-1] to sigma[s])."""

    stochastic: bool = False  # SDE step (True) or deterministic ODE (Euler) step
    branch: int = 1  # children per node at this step; > 1 only for stochastic steps
    store: bool = False  # keep the transition as a trainable edge (only stochastic steps)


@dataclass(frozen=True)
class RolloutPlan:
    """A full rollout recipe for one iteration.

    ``n_roots`` independent initial noises per prompt; when ``n_roots > 1`` their prior density
    N(0, I) is stored as theta-independent "prior" edges so that trajectory log-probabilities cover
    every random choice that separates two leaves (paper App. D.3: a branch at step 1 means B
    independent initial noises).
    """

    n_roots: int
    steps: tuple[StepPlan, ...]

    @property
    def group_size(self) -> int:
        return self.n_roots * math.prod(s.branch for s in self.steps)

    @property
    def stored_steps(self) -> list[int]:
        return [i + 1 for i, s in enumerate(self.steps) if s.store]

    def __post_init__(self) -> None:
        if self.n_roots < 1:
            raise ValueError(f"n_roots must be >= 1, got {self.n_roots}")
        for i, s in enumerate(self.steps, start=1):
            if s.branch < 1:
                raise ValueError(f"step {i}: branch must be >= 1, got {s.branch}")
            if (s.branch > 1 or s.store) and not s.stochastic:
                raise ValueError(f"step {i}: only stochastic steps can branch or be stored")


class Plan:
    """Interface: ``make(step, total_steps, num_steps, rng) -> RolloutPlan``. ``step`` is 0-based."""

    def make(self, step: int, total_steps: int, num_steps: int, rng: np.random.Generator) -> RolloutPlan:
        raise NotImplementedError


def tree_plan(positions: Sequence[int], branch: int, num_steps: int) -> RolloutPlan:
    """A prefix-sharing tree branching ``branch`` ways at each of ``positions`` (1-based, distinct).

    A branch at step 1 is realised as ``branch`` independent initial noises and step 1 is then an ODE
    step (paper App. D.3); every other branch point is a stored SDE step.
    """
    pos = sorted(positions)
    if len(set(pos)) != len(pos) or pos[0] < 1 or pos[-1] > num_steps:
        raise ValueError(f"branch positions {list(positions)} must be distinct steps in [1, {num_steps}]")
    n_roots = branch if pos[0] == 1 else 1
    steps = [
        StepPlan(stochastic=True, branch=branch, store=True) if (s in pos and s != 1) else StepPlan()
        for s in range(1, num_steps + 1)
    ]
    return RolloutPlan(n_roots=n_roots, steps=tuple(steps))


@dataclass
class DynamicTreePlan(Plan):
    """TMPO's Dynamic Stochastic Tree (paper Sec. 4.2, App. C.2): T branch points, B children each.

    ``dynamic=False`` fixes the positions at ``fixed_positions`` (Table 2 "w/o dynamic branching").
    ``s_max=None`` means ``num_steps - 1``: the last step of a CPS sampler has zero noise (so children
    split there would be identical, official-code-notes D2) and Flow-GRPO never trains it either.
    ``curriculum_steps`` is U in ``p = min(u / U, 1)``; ``None`` uses the run's total steps.
    """

    branch: int = 3
    early: Sequence[float] = (1, 2, 3)
    late: Sequence[float] = (1, 3, 5)
    kappa: float = 6.0
    s_min: int = 1
    s_max: int | None = None
    dynamic: bool = True
    fixed_positions: Sequence[int] = (1, 2, 3)
    curriculum_steps: int | None = None
    mu_bar_margin: float = 0.05

    def positions(self, step: int, total_steps: int, num_steps: int, rng: np.random.Generator) -> list[int]:
        s_max = num_steps - 1 if self.s_max is None else self.s_max
        if not self.dynamic:
            return resolve_positions(list(self.fixed_positions), self.s_min, s_max)
        horizon = self.curriculum_steps or total_steps
        progress = min(step / max(horizon, 1), 1.0)
        return sample_branch_positions(
            self.early, self.late, progress, self.s_min, s_max, self.kappa, rng, self.mu_bar_margin
        )

    def make(self, step: int, total_steps: int, num_steps: int, rng: np.random.Generator) -> RolloutPlan:
        return tree_plan(self.positions(step, total_steps, num_steps, rng), self.branch, num_steps)


@dataclass
class IndependentPlan(Plan):
    """K independent trajectories per prompt (Flow-GRPO, GARDO, TMPO "w/o tree").

    ``sde_steps``: stochastic steps (``None`` = all); ``train_steps``: the stochastic steps stored for
    training (``None`` = all SDE steps but the last, Flow-GRPO's ``timestep_fraction = 0.99``, which
    skips the last step whose tiny sigma makes the log-prob overflow); ``train_fraction`` instead trains
    the first ``int(n_sde * train_fraction)`` SDE steps, as the baselines' ``timestep_fraction`` (GARDO: 0.7). ``same_initial_noise=True``
    shares x_T within the group (Flow-GRPO ``same_latent``): the group then splits at the first SDE step.
    With ``sde_steps="branch_schedule"`` the stochastic steps are drawn like TMPO's tree positions
    (``tree``), so "w/o tree" differs from TMPO only in prefix sharing.
    """

    group_size: int = 27
    sde_steps: Sequence[int] | str | None = None
    train_steps: Sequence[int] | None = None
    train_fraction: float | None = None
    same_initial_noise: bool = False
    tree: DynamicTreePlan | None = None

    def __post_init__(self) -> None:
        if self.train_steps is not None and self.train_fraction is not None:
            raise ValueError("sampler.plan: set train_steps or train_fraction, not both")
        if self.train_fraction is not None and not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"sampler.plan.train_fraction must be in (0, 1], got {self.train_fraction}")

    def make(self, step: int, total_steps: int, num_steps: int, rng: np.random.Generator) -> RolloutPlan:
        if self.sde_steps == "branch_schedule":
            if self.tree is None:
                raise ValueError("IndependentPlan(sde_steps='branch_schedule') needs tree=DynamicTreePlan(...)")
            pos = self.tree.positions(step, total_steps, num_steps, rng)
            sde = [p for p in pos if p != 1]  # a "branch" at step 1 is the independent x_T itself
            train = sde
        else:
            sde = list(range(1, num_steps + 1)) if self.sde_steps is None else [int(s) for s in self.sde_steps]
            if self.train_fraction is not None:
                train = sde[: max(1, int(len(sde) * self.train_fraction))]
            else:
                train = sde[:-1] if self.train_steps is None else [int(s) for s in self.train_steps]
        if not set(train) <= set(sde):
            raise ValueError(f"train_steps {train} must be a subset of sde_steps {sde}")
        if any(s < 1 or s > num_steps for s in sde):
            raise ValueError(f"sde_steps {sde} must lie in [1, {num_steps}]")
        shared = self.same_initial_noise
        first = min(sde) if sde else None
        if shared and first is None:
            raise ValueError("same_initial_noise=True needs at least one SDE step, or all K samples are identical")
        steps = []
        for s in range(1, num_steps + 1):
            if s in sde:
                steps.append(StepPlan(stochastic=True, branch=self.group_size if (shared and s == first) else 1, store=s in train))
            else:
                steps.append(StepPlan())
        return RolloutPlan(n_roots=1 if shared else self.group_size, steps=tuple(steps))
