"""Joint preference reward (TMPO paper App. D.2, "Reward normalization").

"HPS-v2.1, ImageReward, and PickScore are combined at equal weight. Before summation, each reward
is independently z-score normalized within the K = 27 trajectory group:
``R~_m = (R_m - mu_m) / (sigma_m + eps)``, eps = 1e-8."

Group structure: the reward receives the ``N`` terminal images of one or more prompts, ordered by
group -- consecutive blocks of ``group_size`` samples form one group (the training loop orders its
leaves that way). With ``group_size=None`` the groups are read from ``metadata[i]["group"]`` (the loop
and the evaluator tag every sample with its prompt's group index), else the whole batch is one group. ``sigma`` is the
population standard deviation (``ddof = 0``, numpy's default, as in Flow-GRPO's stat tracking);
a group whose raw scores are all equal contributes 0 for that reward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

EPS = 1e-8

RewardFn = Callable[..., tuple[Tensor, dict[str, Any]]]


def group_zscore(scores: Tensor, group_size: int, eps: float = EPS) -> Tensor:
    """``(R - mean_group) / (std_group + eps)`` over consecutive blocks of ``group_size`` (population std)."""
    n = scores.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(
            f"the joint reward needs N a multiple of group_size: got N={n}, group_size={group_size} "
            "(samples must come as consecutive groups of K trajectories per prompt)"
        )
    g = scores.double().reshape(n // group_size, group_size)
    z = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + eps)
    return z.reshape(n).to(torch.float32)


def _group_size_from_metadata(metadata: Sequence[Mapping[str, Any]] | None, n: int) -> int:
    """The common size of the consecutive runs of equal ``metadata[i]["group"]``; ``n`` if untagged."""
    if not metadata or any(not isinstance(m, Mapping) or "group" not in m for m in metadata):
        return n
    sizes, run = [], 1
    for prev, cur in zip(metadata, list(metadata)[1:]):
        if cur["group"] == prev["group"]:
            run += 1
        else:
            sizes.append(run)
            run = 1
    sizes.append(run)
    if len(set(sizes)) != 1:
        raise ValueError(f"the joint reward needs equal-size groups, got group sizes {sorted(set(sizes))}")
    return sizes[0]


class JointPreferenceReward:
    """Equal-weight sum of per-group z-scored rewards: ``reward(images, prompts, metadata) -> (Tensor[N], info)``.

    Args:
        rewards: ``{name: reward}``; each follows the reward protocol (e.g.
            :class:`tmpo.rewards.preference.PreferenceReward`).
        group_size: ``K``, the trajectories per prompt; consecutive blocks of ``K`` samples are one
            group. None: the whole batch is one group.

    ``info``: ``aux`` = ``{name: raw scores [N]}`` (GARDO reads its auxiliary rewards there),
    ``raw`` (the same dict), ``z`` = ``{name: z-scores [N]}``, ``group_size``, and each
    component's own info under ``infos[name]``.
    """

    def __init__(self, rewards: Mapping[str, RewardFn], group_size: int | None = None) -> None:
        if not rewards:
            raise ValueError("JointPreferenceReward needs at least one reward")
        for name, fn in rewards.items():
            if not callable(fn):
                raise ValueError(f"reward {name!r} is not callable: {fn!r}")
        if group_size is not None and (isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1):
            raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
        self.rewards = dict(rewards)
        self.group_size = None if group_size is None else int(group_size)

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        n = images.shape[0]
        k = self.group_size if self.group_size is not None else _group_size_from_metadata(metadata, n)
        if n == 0 or n % k:
            raise ValueError(
                f"the joint reward got N={n} samples, not a multiple of group_size={k} "
                "(samples must come as consecutive groups of K trajectories per prompt)"
            )
        raw: dict[str, Tensor] = {}
        z: dict[str, Tensor] = {}
        infos: dict[str, Any] = {}
        for name, fn in self.rewards.items():
            scores, info = fn(images, prompts, metadata)
            scores = torch.as_tensor(scores).detach().float().reshape(-1).cpu()
            if scores.shape[0] != n:
                raise ValueError(f"reward {name!r} returned {scores.shape[0]} scores for {n} samples")
            raw[name], z[name], infos[name] = scores, group_zscore(scores, k), info
        total = torch.stack(list(z.values())).sum(0).to(images.device)
        return total, {"aux": dict(raw), "raw": raw, "z": z, "group_size": k, "infos": infos}
