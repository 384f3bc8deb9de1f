"""Faults named honestly: what went non-finite (the policy's samples, its log-probs, the reward, an
evaluation) and where, and advantages that carry no learning signal.

The loop raises :class:`NonFiniteError` instead of zeroing a value; the checks are pure functions of
a rollout or a metrics row so they can be tested on hand-made inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


class NonFiniteError(ValueError):
    """A non-finite value that would otherwise be trained on or reported (never replaced by zeros)."""


class PeerFailure(RuntimeError):
    """With several processes, an error while one of them rolled out or scored (e.g. a reward server that
    stayed down): every process raises this at the same iteration, so none waits forever in a collective."""


def _bad_groups(values: Tensor, groups: Tensor) -> list[int]:
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    return sorted({int(g) for g in groups[bad].tolist()})


def rollout_fault(rollout, iteration: int) -> str | None:
    """Describe non-finite samples or stored log-probs of ``rollout`` (``None`` if all are finite).

    Checked before the reward sees the samples: a diverged policy shows up here, named as such,
    with the iteration and the prompts whose samples broke."""
    checks = [
        ("samples (the rollout's final latents)", rollout.leaves, rollout.group.cpu()),
        ("log-probs of the sampled transitions", rollout.edge_log_prob_old,
         rollout.parent_group.cpu()[rollout.edge_parent.cpu()]),
    ]
    for what, values, groups in checks:
        finite = torch.isfinite(values.detach().reshape(values.shape[0], -1)).all(dim=1)
        if bool(finite.all()):
            continue
        bad = _bad_groups(values.detach().cpu(), groups)
        prompts = [rollout.prompts[g] for g in bad]
        shown = ", ".join(repr(p) for p in prompts[:5]) + (f" and {len(prompts) - 5} more" if len(prompts) > 5 else "")
        return (f"the policy diverged at iteration {iteration}: {int((~finite).sum())} of {finite.numel()} {what} are "
                f"non-finite, for prompt(s) {shown}. Its weights produce NaN/inf (the previous update was too large): "
                "lower trainer.lr or trainer.grad_clip")
    return None


def eval_fault(metrics: Mapping[str, float], fatal: Sequence[str] = ("reward",)) -> tuple[str | None, list[str]]:
    """``(error for a non-finite fatal metric or None, names of other non-finite metrics)``."""
    bad = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(float(v))]
    fatal_bad = [k for k in bad if k in fatal]
    error = None
    if fatal_bad:
        error = (f"evaluation returned non-finite {', '.join(f'{k}={metrics[k]}' for k in fatal_bad)}; "
                 "the evaluated (EMA) policy or the reward is broken")
    return error, [k for k in bad if k not in fatal_bad]


def degenerate_advantages(metrics: Mapping[str, float], adv_clip: float | None, tol: float = 1e-12) -> str | None:
    """A warning when an iteration's advantages carry no signal: zero spread over every leaf, or every
    value at the clamp (a reward on the wrong scale). ``None`` when the advantages look usable."""
    mean, std = metrics.get("train/adv_mean"), metrics.get("train/adv_std")
    if mean is None or std is None or not (math.isfinite(mean) and math.isfinite(std)):
        return None
    at_clamp = adv_clip is not None and abs(abs(mean) - adv_clip) <= 1e-6 * max(1.0, adv_clip)
    if std > tol and not (at_clamp and std <= 1e-6):
        return None
    reward = f"reward mean {metrics.get('train/reward_mean', float('nan')):.6g}, std {metrics.get('train/reward_std', float('nan')):.6g}"
    where = f", every value at the clamp objective.adv_clip={adv_clip:g}" if at_clamp else ""
    return (f"degenerate advantages: std {std:.3g} over the iteration's samples (mean {mean:.6g}{where}; {reward}); "
            "this update carries no learning signal. Check the reward's scale and spread")
