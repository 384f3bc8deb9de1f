"""The 2-D Gaussian-mixture world of the toy experiment (after the paper's Fig. 2).

Five modes with different data weights and rewards: a common top-reward mode (A), a high-reward
mode (B), a *non-reward* mode with plenty of data (C), a *rare-density* high-reward mode (D) and a
mid-reward broad centre mode (E). The pre-trained flow model reproduces the data weights; a
mode-covering method should move towards the Boltzmann target over modes, a mode-seeking one onto A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Mode:
    name: str
    center: tuple[float, float]
    std: float
    weight: float  # data (pre-training) probability
    reward: float  # reward at the centre


DEFAULT_MODES: tuple[Mode, ...] = (
    Mode("A", (2.5, 2.5), 0.45, 0.40, 1.0),
    Mode("B", (-2.5, 2.5), 0.45, 0.25, 0.8),
    Mode("C", (-2.5, -2.5), 0.45, 0.20, 0.0),
    Mode("D", (2.5, -2.5), 0.45, 0.05, 0.9),
    Mode("E", (0.0, 0.0), 0.70, 0.10, 0.5),
)


@dataclass(frozen=True)
class ToyMixture:
    modes: tuple[Mode, ...] = DEFAULT_MODES
    reward_width: float = 1.0  # length scale of each mode's reward bump
    assign_radius: float = 3.0  # a point belongs to a mode within this many of the mode's stds

    @property
    def centers(self) -> Tensor:
        return torch.tensor([m.center for m in self.modes])

    @property
    def stds(self) -> Tensor:
        return torch.tensor([m.std for m in self.modes])

    @property
    def weights(self) -> Tensor:
        w = torch.tensor([m.weight for m in self.modes])
        return w / w.sum()

    @property
    def mode_rewards(self) -> Tensor:
        return torch.tensor([m.reward for m in self.modes])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` points from the data distribution, ``[n, 2]``."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn((n, 2), generator=generator)
        return self.centers[idx] + self.stds[idx, None] * eps

    def reward(self, x: Tensor) -> Tensor:
        """``R(x) = max_m r_m exp(-||x - c_m||^2 / (2 w^2))``, ``[N]``: ~r_m inside mode m, 0 far away."""
        d2 = ((x[:, None, :].float() - self.centers[None].to(x.device)) ** 2).sum(-1)
        bumps = self.mode_rewards.to(x.device)[None] * torch.exp(-d2 / (2 * self.reward_width**2))
        return bumps.max(dim=1).values

    def assign(self, x: Tensor) -> Tensor:
        """Mode index of each point (nearest in std units), or -1 when outside every mode, ``[N]``."""
        d = torch.cdist(x.float(), self.centers.to(x.device)) / self.stds.to(x.device)[None]
        dist, idx = d.min(dim=1)
        return torch.where(dist <= self.assign_radius, idx, torch.full_like(idx, -1))

    def boltzmann_target(self, beta: float) -> Tensor:
        """Target occupancy over modes ``q_m ∝ exp(beta r_m)`` (each mode one solution), ``[M]``."""
        return torch.softmax(beta * self.mode_rewards, dim=0)
