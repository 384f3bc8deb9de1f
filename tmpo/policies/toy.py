"""Toy backend: a 3-layer MLP velocity field on 2-D points (paper Fig. 2), pre-trained by flow matching.

``python -m tmpo.policies.toy`` re-creates the committed checkpoint ``tmpo/assets/toy_flow.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tmpo.policies.base import FlowPolicy
from tmpo.toyworld import ToyMixture

ASSET = Path(__file__).resolve().parent.parent / "assets" / "toy_flow.pt"


def timestep_embedding(sigma: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of the noise level, ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=sigma.dtype, device=sigma.device) * (-math.log(1000.0) / half))
    ang = 1000.0 * sigma[:, None] * freqs[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


class ToyVelocityMLP(nn.Module):
    """Three linear layers: ``[x, emb(sigma)] -> hidden -> hidden -> 2``."""

    def __init__(self, hidden: int = 256, time_dim: int = 32) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.fc1 = nn.Linear(2 + time_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, 2)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        h = torch.cat([x, timestep_embedding(sigma, self.time_dim)], dim=1)
        h = nn.functional.silu(self.fc1(h))
        h = nn.functional.silu(self.fc2(h))
        return self.fc3(h)


class ToyPolicy(FlowPolicy):
    """Unconditional 2-D flow policy; prompts are ignored (every group is "the toy")."""

    latent_shape = (2,)

    def __init__(self, checkpoint: str | None = None, hidden: int = 256, lora: dict | None = None) -> None:
        super().__init__()
        self.net = ToyVelocityMLP(hidden=hidden)
        path = Path(checkpoint) if checkpoint else ASSET
        if not path.exists():
            raise FileNotFoundError(f"toy checkpoint {path} not found; create it with `python -m tmpo.policies.toy`")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.net.load_state_dict(state["model"])
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"{path} is not a toy flow checkpoint for hidden={hidden}: {e}") from e
        self.setup_finetuning(lora)

    def sigmas(self, num_steps: int) -> Tensor:
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def encode_prompts(self, prompts: list[str]) -> Any:
        return None

    def _velocity(self, net: nn.Module, x: Tensor, sigma: Tensor, cond: Any, index: Tensor) -> Tensor:
        return net(x, sigma)

    def decode(self, latents: Tensor) -> Tensor:
        return latents


def pretrain(steps: int = 4000, batch: int = 1024, lr: float = 2e-3, seed: int = 0, hidden: int = 256) -> tuple[nn.Module, float]:
    """Flow matching on the toy mixture: regress ``v(x_s, s)`` onto ``x1 - x0`` with ``x_s = (1-s) x0 + s x1``."""
    torch.manual_seed(seed)
    world = ToyMixture()
    net = ToyVelocityMLP(hidden=hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    loss_avg = float("nan")
    for i in range(steps):
        x0 = world.sample(batch)
        x1 = torch.randn_like(x0)
        s = torch.rand(batch)
        xs = (1 - s[:, None]) * x0 + s[:, None] * x1
        loss = ((net(xs, s) - (x1 - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_avg = loss.item() if i == 0 else 0.99 * loss_avg + 0.01 * loss.item()
    return net, loss_avg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ASSET)
    args = ap.parse_args()
    torch.set_num_threads(1)
    net, loss = pretrain(steps=args.steps, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    card = {"command": f"python -m tmpo.policies.toy --steps {args.steps} --seed {args.seed}", "final_loss_ema": loss}
    torch.save({"model": net.state_dict(), "card": card}, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card))


if __name__ == "__main__":
    main()
