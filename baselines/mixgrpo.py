"""MixGRPO (Li et al. 2025, arXiv 2507.21802): mixed ODE-SDE rollouts with a sliding SDE window.

Everything else (Flow-GRPO 'sde' step and log-prob, z-scored group advantage, per-step PPO clip,
KL to reference) is the shared core; only the window schedule lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tmpo.samplers.plans import Plan, RolloutPlan, StepPlan


def window_start(iteration: int, n_positions: int, shift_every: int, shift: int) -> int:
    """0-based start ``l``: grows by ``shift`` every ``shift_every`` iterations, wrapping at ``n_positions``."""
    if n_positions < 1 or shift_every < 1 or shift < 0:
        raise ValueError("n_positions and shift_every must be >= 1 and shift >= 0")
    return ((iteration // shift_every) * shift) % n_positions


def sliding_window(iteration: int, num_steps: int, window: int, shift_every: int, shift: int) -> list[int]:
    """MixGRPO's "progressive" window at an iteration, as 1-based steps.

    Its code (0-based): ``W = [l, min(l + w, N - 2))``, ``l`` starts at 0 and grows by ``shift`` every
    ``shift_every`` iterations, rolling back to 0 when it passes the cap ``N - 2`` (so the last steps are
    never trained). We roll back as soon as the window would be empty (``l >= N - 2``), which the
    original's ``l > N - 2`` test allows for one period; ``shift = 0`` freezes the window (Flash*).
    """
    cap = num_steps - 2
    if cap < 1:
        raise ValueError(f"MixGRPO needs at least 3 denoising steps, got {num_steps}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    start = window_start(iteration, cap, shift_every, shift)
    return [j + 1 for j in range(start, min(start + window, cap))]


@dataclass
class SlidingWindowPlan(Plan):
    """One shared x_T per prompt (``init_same_noise``), ODE outside the window, SDE inside it.

    The group of K splits at the window's first step (K children of the shared ODE prefix); every
    window step is stored and trained. MixGRPO recomputes the shared prefix for each sample; sharing
    it here gives the same samples for less compute.
    """

    group_size: int = 27
    window: int = 4
    shift_every: int = 25
    shift: int = 1

    def make(self, step: int, total_steps: int, num_steps: int, rng: np.random.Generator) -> RolloutPlan:
        win = sliding_window(step, num_steps, self.window, self.shift_every, self.shift)
        steps = [
            StepPlan(stochastic=True, branch=self.group_size if s == win[0] else 1, store=True) if s in win else StepPlan()
            for s in range(1, num_steps + 1)
        ]
        return RolloutPlan(n_roots=1, steps=tuple(steps))
