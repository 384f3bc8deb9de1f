"""Look at what a model generates: the ``samples.png`` every run writes, and generation from a trained run.

    python -m tmpo.sample <run-dir> "a red circle left of a blue square" -n 8 --out grid.png
    python -m tmpo.sample <run-dir> "a red circle" "two blue squares" -n 4 --compare-base --out grid.png

The run's ``config.yaml`` rebuilds its model; its checkpoint gives the weights the run's evaluation scored
(``--weights evaluated``: the EMA once it was updated, else the live weights; or ``ema``, ``live``,
``base``). Sampling is the evaluation's: deterministic ODE with ``eval.num_steps`` steps, initial noise from
``--seed`` (default ``eval.seed``), so ``--compare-base`` shows base and trained from the same noise.
Images are drawn as a grid, one labelled row per prompt; the 2-D toy's points as a scatter per panel.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tmpo.checkpoint import write_bytes_atomic
from tmpo.policies.base import FlowPolicy
from tmpo.samplers.sampler import sample_ode

_log = logging.getLogger(__name__)
WEIGHTS = ("evaluated", "ema", "live", "base")
MAX_TILE = 128  # pixels per image in a grid (larger images are downsampled: a 512x512 grid of 48 is 50 MB)


# --- sampling ----------------------------------------------------------------------------------
@torch.no_grad()
def generate(policy: FlowPolicy, prompts: Sequence[str], n: int, num_steps: int, seed: int) -> Tensor:
    """``n`` decoded samples per prompt (ordered by prompt) from initial noise seeded by ``seed``."""
    latents = sample_ode(policy, list(prompts), n, num_steps, torch.Generator().manual_seed(seed))
    return policy.decode(latents).detach().float().cpu()


@contextlib.contextmanager
def holding(policy: FlowPolicy, state: dict[str, Tensor] | None) -> Iterator[None]:
    """Within this context the policy's trainable weights are ``state`` (``None``: unchanged)."""
    if state is None:
        yield
        return
    live = policy.trainable_state()
    policy.load_trainable_state(state)
    try:
        yield
    finally:
        policy.load_trainable_state(live)


def spread_prompts(prompts: Sequence[str], count: int) -> list[str]:
    """``count`` prompts evenly spaced over a list (the test split is ordered by task tag)."""
    if len(prompts) <= count:
        return list(prompts)
    return [prompts[i] for i in np.linspace(0, len(prompts) - 1, count).round().astype(int)]


# --- drawing -----------------------------------------------------------------------------------
def is_image_batch(x: Tensor) -> bool:
    return x.ndim == 4 and x.shape[1] in (1, 3)


def is_point_batch(x: Tensor) -> bool:
    return x.ndim == 2 and x.shape[1] == 2


def mosaic(images: Tensor, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """``[rows*cols, C, H, W]`` images in [0, 1] -> one ``[H', W', 3]`` array, white gaps of ``pad`` px."""
    if images.shape[-1] > MAX_TILE:
        images = torch.nn.functional.interpolate(images, size=(MAX_TILE, MAX_TILE), mode="area")
    images = images.clamp(0, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    _, _, h, w = images.shape
    out = np.ones((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), dtype=np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = img.permute(1, 2, 0).numpy()
    return out


def save_panels(panels: Sequence[tuple[str, Tensor]], prompts: Sequence[str], n: int, path: str | Path,
                title: str = "") -> Path:
    """Draw panels of samples side by side (``(panel title, decoded [P*n, ...])``) and save a PNG.

    Images: one row per prompt (labelled on the left), ``n`` columns per panel; the same column holds
    the same initial noise in every panel. 2-D points: one scatter per panel on shared axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = panels[0][1]
    path = Path(path)
    if is_image_batch(first):
        rows = len(prompts)
        label_w = 0.09 * max(min(max(len(p) for p in prompts), 34), 10)
        fig, axes = plt.subplots(1, len(panels), squeeze=False,
                                 figsize=(label_w + 0.75 * n * len(panels) + 0.2, 0.75 * rows + 0.7))
        for j, (ax, (name, x)) in enumerate(zip(axes[0], panels)):
            ax.imshow(mosaic(x, rows, n), interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            h = x.shape[-1] if x.shape[-1] <= MAX_TILE else MAX_TILE
            ax.set_yticks([(h + 1) * r + h / 2 for r in range(rows)] if j == 0 else [])
            if j == 0:
                ax.set_yticklabels([textwrap.fill(p, 34) for p in prompts], fontsize=7)
            ax.tick_params(length=0)
    elif is_point_batch(first):
        fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(3.2 * len(panels), 3.4), sharex=True, sharey=True)
        for ax, (name, x) in zip(axes[0], panels):
            ax.scatter(x[:, 0].numpy(), x[:, 1].numpy(), s=2, alpha=0.4)
            ax.set_title(name, fontsize=9)
            ax.set_aspect("equal")
    else:
        raise ValueError(f"cannot draw samples of shape {tuple(first.shape)}: expected images [N, C, H, W] or 2-D points [N, 2]")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=150)
    plt.close(fig)
    return write_bytes_atomic(png.getvalue(), path)


# --- the run's samples.png -----------------------------------------------------------------------
def write_run_samples(trainer: Any, initial_state: dict[str, Tensor], prompts: Sequence[str], n: int,
                      num_steps: int, seed: int, path: str | Path) -> Path | None:
    """``samples.png``: the untrained model (``initial_state``) vs the weights the final eval scored
    (``trainer.weights_for_eval``), same prompts and initial noise. ``None`` (and a log line) when the
    model's outputs are neither images nor 2-D points."""
    policy = trainer.policy
    with holding(policy, initial_state):
        base = generate(policy, prompts, n, num_steps, seed)
    if not (is_image_batch(base) or is_point_batch(base)):
        _log.info("no samples.png: the model's outputs (shape %s) are neither images nor 2-D points", tuple(base.shape))
        return None
    with trainer.weights_for_eval() as which:
        trained = generate(policy, prompts, n, num_steps, seed)
    label = {"ema": "EMA", "live": "live", "initial": "untrained"}.get(which, which)
    panels = [("base (untrained)", base), (f"trained: {label} weights, iteration {trainer.step}", trained)]
    where = "per column" if is_image_batch(base) else "in both panels"
    return save_panels(panels, prompts, n, path, title=f"same initial noise {where} (eval seed {seed}, {num_steps} ODE steps)")


# --- a trained run -------------------------------------------------------------------------------
def evaluated_weights_name(state: dict[str, Any]) -> str:
    """What the run's evaluation scored at this checkpoint (``tmpo.loop.Trainer.evaluated_weights``)."""
    every = int((state.get("trainer_config") or {}).get("ema_every", 1))
    return "ema" if int(state["step"]) // every > 0 else "live"


@dataclass
class RunModel:
    """A run's policy holding the chosen weights, its config, which weights, the iteration, and the
    untrained weights (for ``--compare-base``)."""

    policy: FlowPolicy
    config: Any
    weights: str
    step: int
    initial_state: dict[str, Tensor]


def load_run_policy(run_dir: str | Path, weights: str = "evaluated") -> RunModel:
    """Rebuild a run directory's model from its ``config.yaml`` and load the chosen checkpoint weights."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tmpo.checkpoint import load_checkpoint
    from tmpo.seeding import seed_everything

    if weights not in WEIGHTS:
        raise ValueError(f"--weights={weights!r} is invalid: valid options: {', '.join(WEIGHTS)}")
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: pass a run directory written by `python -m tmpo.run`")
    cfg = OmegaConf.load(config_path)
    seed_everything(int(cfg.trainer.seed))  # the same untrained start as the run (a LoRA's random A)
    policy = instantiate(cfg.model)
    policy.eval()
    initial = policy.trainable_state()
    if weights == "base":
        return RunModel(policy, cfg, "base", 0, initial)
    state = load_checkpoint(run_dir)
    used = evaluated_weights_name(state) if weights == "evaluated" else weights
    policy.load_trainable_state(state["ema"] if used == "ema" else state["policy"])
    return RunModel(policy, cfg, used, int(state["step"]), initial)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tmpo.sample", description=__doc__.split("\n\n")[0],
        epilog='example: python -m tmpo.sample outputs/tmpo/<run> "a red circle left of a blue square" -n 8 --out grid.png')
    parser.add_argument("run_dir", help="a run directory written by python -m tmpo.run")
    parser.add_argument("prompts", nargs="+", help="one or more prompts (the toy ignores its prompt)")
    parser.add_argument("-n", type=int, default=8, help="samples per prompt (default 8)")
    parser.add_argument("--out", default="grid.png", help="PNG to write (default grid.png)")
    parser.add_argument("--weights", default="evaluated", choices=WEIGHTS,
                        help="evaluated (default: what the run's eval scored), ema, live or base")
    parser.add_argument("--compare-base", action="store_true", help="add the untrained model from the same noise")
    parser.add_argument("--seed", type=int, default=None, help="initial-noise seed (default: the run's eval.seed)")
    parser.add_argument("--steps", type=int, default=None, help="ODE steps (default: the run's eval.num_steps)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"-n={args.n} is invalid: must be an integer >= 1")
    try:
        run = load_run_policy(args.run_dir, args.weights)
        seed = int(run.config.eval.seed) if args.seed is None else args.seed
        steps = int(run.config.eval.num_steps) if args.steps is None else args.steps
        if steps < 1:
            raise ValueError(f"--steps={steps} is invalid: must be an integer >= 1")
        name = f"{run.weights} weights" + (f", iteration {run.step}" if run.step else "")
        panels = [(name, generate(run.policy, args.prompts, args.n, steps, seed))]
        if args.compare_base and run.weights != "base":
            with holding(run.policy, run.initial_state):
                panels.insert(0, ("base (untrained)", generate(run.policy, args.prompts, args.n, steps, seed)))
        title = f"{Path(args.run_dir).resolve().name} (seed {seed}, {steps} steps)"
        out = save_panels(panels, args.prompts, args.n, args.out, title=title)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"tmpo.sample: {e}")
    print(f"wrote {out} ({len(args.prompts)} prompt(s) x {args.n}, {run.weights} weights)")


if __name__ == "__main__":
    main()
