"""Toy reward and metrics on the 2-D Gaussian mixture (paper Fig. 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from tmpo.toyworld import ToyMixture


class GMMModeReward:
    """Reward of a 2-D point: the bump of its nearest reward mode (see :class:`~tmpo.toyworld.ToyMixture`)."""

    def __init__(self, reward_width: float = 1.0) -> None:
        self.world = ToyMixture(reward_width=reward_width)

    def __call__(self, samples: Tensor, prompts: list[str], metadata: list[dict]) -> tuple[Tensor, dict]:
        if samples.ndim != 2 or samples.shape[1] != 2:
            raise ValueError(f"GMMModeReward scores 2-D points [N, 2], got {tuple(samples.shape)}: use it with model=toy")
        return self.world.reward(samples), {}


def mode_occupancy(assign: Tensor, n_modes: int) -> Tensor:
    """Fraction of all samples in each mode, ``[n_modes]`` (off-mode samples count in no bin)."""
    counts = torch.bincount(assign[assign >= 0], minlength=n_modes).double()
    return counts / max(assign.numel(), 1)


def kl_divergence(p: Tensor, q: Tensor) -> float:
    """``KL(p || q) = sum_m p_m log(p_m / q_m)`` with ``0 log 0 = 0``; both normalised first."""
    p = p.double() / p.sum()
    q = q.double() / q.sum()
    nz = p > 0
    return float((p[nz] * (p[nz].log() - q[nz].log())).sum())


class ModeCoverage:
    """Evaluation metrics: per-mode occupancy, modes covered, KL to the Boltzmann target over modes.

    * ``modes_covered``: modes holding at least ``min_share`` of the samples.
    * ``kl_to_target``: ``KL(occupancy || q)``, occupancy normalised over on-mode samples and
      ``q_m ∝ exp(beta r_m)`` (beta = TMPO's final 2.0). Finite when modes are dropped.
    * ``fwd_kl_to_target``: ``KL(q || occupancy)`` with add-1/2 smoothing of the counts, which grows
      when a mode with target weight is dropped (the forward-KL view of the paper).
    """

    def __init__(self, beta: float = 2.0, min_share: float = 0.01) -> None:
        self.world = ToyMixture()
        self.beta = beta
        self.min_share = min_share

    def __call__(
        self, samples: Tensor, latents: Tensor, prompts: list[str], metadata: list[dict], group_size: int = 1
    ) -> dict[str, float]:
        n_modes = len(self.world.modes)
        assign = self.world.assign(samples)
        occ = mode_occupancy(assign, n_modes)
        if occ.sum() == 0:
            raise ValueError("ModeCoverage: no sample landed in any mode; the policy has diverged")
        target = self.world.boltzmann_target(self.beta).double()
        counts = torch.bincount(assign[assign >= 0], minlength=n_modes).double()
        out = {
            "modes_covered": float((occ >= self.min_share).sum()),
            "n_modes": float(n_modes),
            "kl_to_target": kl_divergence(occ, target),
            "fwd_kl_to_target": kl_divergence(target, counts + 0.5),
            "off_mode": float((assign < 0).double().mean()),
        }
        for m, mode in enumerate(self.world.modes):
            out[f"occ_{mode.name}"] = float(occ[m])
        return out
