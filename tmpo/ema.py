"""Exponential moving average of the trainable parameters (paper App. D.3: decay 0.9 every 8 steps)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copies updated as ``shadow = decay * shadow + (1 - decay) * param`` every ``every`` steps.

    Used only for evaluation and saved checkpoints, never for sampling rollouts. ``decay = 0`` means no
    EMA (MixGRPO): the shadow then follows the live weights after every step, whatever ``every`` is, so a
    scale that stretches the interval for the other methods never makes it lag behind the last step.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float = 0.9, every: int = 8) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        self.params = dict(named_params)
        self.decay, self.every = decay, every
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Call after optimizer step ``step`` (0-based); updates on every ``every``-th step."""
        if (step + 1) % self.every and self.decay > 0.0:
            return False
        for n, p in self.params.items():
            self.shadow[n].mul_(self.decay).add_(p.detach(), alpha=1.0 - self.decay)
        return True

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily load the EMA weights into the model."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state in the checkpoint does not match the model's trainable parameters")
        self.shadow = {n: t.clone() for n, t in state.items()}
