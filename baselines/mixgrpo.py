"""MixGRPO (Li et al. 2025, arXiv 2507.21802): mixed ODE-SDE rollouts with a sliding SDE window.

Everything else (Flow-GRPO 'sde' step and log-prob, z-scored group advantage, per-step PPO clip,
KL to reference) is the shared core; only the window schedule lives here.
"""

from __future__ import annotations

import math
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


WINDOW_SCALINGS = ("horizon", "literal")


def scaled_window(
    num_steps: int, total_steps: int, window: int, shift_every: int, shift: int, reference_steps: int, reference_iterations: int
) -> tuple[int, int, int]:
    """MixGRPO's window settings carried from its horizon to ``num_steps`` steps: ``(window, shift_every, shift)``.

    MixGRPO tunes ``w = 4`` SDE steps of a ``N_ref = 25``-step schedule, moved by ``s = 1`` step every
    ``tau = 25`` of its ``T_ref = 300`` iterations. Copied literally onto 6 steps that window covers two
    thirds of the horizon and, capped at ``N - 2``, shrinks 4 -> 3 -> 2 -> 1 as it slides. We keep the
    fractions instead:

    * the window's share of the horizon: ``w' = max(1, round(w N / N_ref))`` (4/25 of 6 steps -> 1 step);
    * the speed at which the window moves through the horizon, ``(s / N_ref)`` per ``(tau / T_ref)`` of
      the run, with whole-step moves: ``s' = 1`` every ``tau' = round(T tau N_ref / (N s T_ref))``
      iterations of a ``T``-iteration run (104 of 300 on 6 steps: windows at steps 1, 2, 3, the part of
      the noise schedule, sigma 1 -> 0.75, that MixGRPO's own run sweeps, sigma 1 -> 0.67).

    ``shift = 0`` (MixGRPO-Flash*, a frozen window) stays frozen.
    """
    scaled_w = max(1, int(math.floor(window * num_steps / reference_steps + 0.5)))
    if shift == 0:
        return scaled_w, max(1, shift_every), 0
    period = total_steps * shift_every * reference_steps / (num_steps * shift * reference_iterations)
    return scaled_w, max(1, int(math.floor(period + 0.5))), 1


@dataclass
class SlidingWindowPlan(Plan):
    """One shared x_T per prompt (``init_same_noise``), ODE outside the window, SDE inside it.

    The group of K splits at the window's first step (K children of the shared ODE prefix); every
    window step is stored and trained. MixGRPO recomputes the shared prefix for each sample; sharing
    it here gives the same samples for less compute.

    ``window``, ``shift_every`` and ``shift`` are MixGRPO's values for its ``reference_steps``-step,
    ``reference_iterations``-iteration setting. ``scaling="horizon"`` (default) carries them to this
    run's horizon and length by :func:`scaled_window`; ``scaling="literal"`` uses them as they are.
    """

    group_size: int = 27
    window: int = 4
    shift_every: int = 25
    shift: int = 1
    scaling: str = "horizon"
    reference_steps: int = 25
    reference_iterations: int = 300

    def __post_init__(self) -> None:
        if self.scaling not in WINDOW_SCALINGS:
            raise ValueError(f"sampler.plan.scaling={self.scaling!r}; valid options: {', '.join(WINDOW_SCALINGS)}")

    def settings(self, num_steps: int, total_steps: int) -> tuple[int, int, int]:
        """``(window, shift_every, shift)`` in effect for this horizon and run length."""
        if self.scaling == "literal":
            return self.window, self.shift_every, self.shift
        return scaled_window(num_steps, total_steps, self.window, self.shift_every, self.shift,
                             self.reference_steps, self.reference_iterations)

    def make(self, step: int, total_steps: int, num_steps: int, rng: np.random.Generator) -> RolloutPlan:
        window, shift_every, shift = self.settings(num_steps, total_steps)
        win = sliding_window(step, num_steps, window, shift_every, shift)
        steps = [
            StepPlan(stochastic=True, branch=self.group_size if s == win[0] else 1, store=True) if s in win else StepPlan()
            for s in range(1, num_steps + 1)
        ]
        return RolloutPlan(n_roots=1, steps=tuple(steps))
