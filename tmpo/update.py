"""The policy update shared by every method: an exact edge-level gradient in two passes.

Any objective here is a function of the stored edges' log-probs ``l_e(theta)`` (plus a detached
RatioNorm bias). Its gradient is ``sum_e (dL/dl_e) * grad l_e``. So:

1. *pass 1* (no grad): recompute every parent's transition mean once, get ``l_e`` for all edges of the
   minibatch, evaluate the objective on a leaf copy of ``l`` and read off ``g_e = dL/dl_e``;
2. *pass 2* (grad): in chunks of parent states, recompute the means with grad and back-propagate
   ``sum_e g_e l_e`` (+ the KL-to-reference term).

Each stored transition's forward runs once per pass and its backward once, whatever the number of
leaves sharing it, and siblings share their parent's forward. Memory is bounded by the chunk size,
and the gradient is the exact gradient of the loss (not an approximation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tmpo.objectives.base import Minibatch, Objective, Prepared
from tmpo.policies.base import FlowPolicy
from tmpo.samplers.rollout import Rollout
from tmpo.samplers.sampler import edge_log_probs, recompute_means
from tmpo.sde import gaussian_kl_equal_std


def kl_parent_weights(rollout: Rollout, mb: Minibatch, leaf_weight: Tensor | None, parent_ids: Tensor) -> Tensor:
    """Weights of each parent's KL term so that the KL penalty is the (leaf-weighted) mean over leaves of
    the mean KL along each leaf's stored, trainable steps. ``[len(parent_ids)]``; sums to 1 (or 0 if
    every leaf weight is 0, e.g. GARDO's gate flagged nothing)."""
    trainable = (~mb.edge_is_prior).to(mb.path.dtype)
    path = mb.path * trainable[None, :]
    steps = path.sum(dim=1).clamp(min=1.0)
    w = torch.ones(mb.leaf_ids.numel(), dtype=path.dtype) if leaf_weight is None else leaf_weight[mb.leaf_ids].to(path.dtype)
    total = w.sum()
    edge_w = (w / steps) @ path / total if total > 0 else torch.zeros(path.shape[1], dtype=path.dtype)
    local = torch.full((rollout.parent_x.shape[0],), -1, dtype=torch.long)
    local[parent_ids] = torch.arange(parent_ids.numel())
    out = torch.zeros(parent_ids.numel(), dtype=path.dtype)
    out.index_add_(0, local[rollout.edge_parent[mb.edge_ids]], edge_w)
    return out


def _chunks(ids: Tensor, size: int) -> list[Tensor]:
    return list(torch.split(ids, max(int(size), 1)))


def minibatch_gradient(
    policy: FlowPolicy,
    rollout: Rollout,
    objective: Objective,
    prepared: Prepared,
    mb: Minibatch,
    parent_chunk: int,
) -> dict[str, Tensor]:
    """Accumulate ``d(loss)/d(theta)`` of one minibatch into ``.grad`` (two passes, see module doc)."""
    parent_ids = torch.unique(rollout.edge_parent[mb.edge_ids])
    with torch.no_grad():
        means = torch.cat([recompute_means(policy, rollout, c) for c in _chunks(parent_ids, parent_chunk)])
    edge_ids, log_prob = edge_log_probs(rollout, parent_ids, means)
    if not torch.equal(edge_ids, mb.edge_ids):
        raise RuntimeError("internal: minibatch edges and recomputed edges disagree")
    std = rollout.parent_std[parent_ids]
    parent_bias = gaussian_kl_equal_std(means, rollout.parent_mean_old[parent_ids], std)
    local = torch.full((rollout.parent_x.shape[0],), -1, dtype=torch.long)
    local[parent_ids] = torch.arange(parent_ids.numel())
    edge_bias = parent_bias[local[rollout.edge_parent[edge_ids]]]

    lp = log_prob.detach().clone().requires_grad_(True)
    loss, stats = objective.loss(mb, lp, edge_bias, prepared)
    loss.backward()  # also fills .grad of any parameters the objective owns
    coef = lp.grad.detach()

    kl_w = kl_parent_weights(rollout, mb, prepared.kl_leaf_weight, parent_ids) if objective.kl_coef > 0 else None
    edge_pos = torch.full((rollout.edge_parent.numel(),), -1, dtype=torch.long)
    edge_pos[mb.edge_ids] = torch.arange(mb.edge_ids.numel())
    kl_total = torch.zeros(())
    model_parents = torch.nonzero(~rollout.parent_is_prior[parent_ids]).squeeze(1)
    for rows in _chunks(model_parents, parent_chunk):
        ids = parent_ids[rows]
        means_c = recompute_means(policy, rollout, ids)
        e_ids, lp_c = edge_log_probs(rollout, ids, means_c)
        surrogate = (coef[edge_pos[e_ids]] * lp_c).sum()
        if kl_w is not None:
            with torch.no_grad(), policy.reference():
                ref = recompute_means(policy, rollout, ids)
            kl = gaussian_kl_equal_std(means_c, ref, rollout.parent_std[ids])
            kl_term = (kl_w[rows].to(kl.dtype) * kl).sum()
            surrogate = surrogate + objective.kl_coef * kl_term
            kl_total = kl_total + kl_term.detach()
        surrogate.backward()
    stats = dict(stats)
    stats["loss"] = loss.detach()
    stats["kl_ref"] = kl_total
    stats["log_prob_drift"] = (log_prob - mb.log_prob_old).abs().max().detach()
    return stats


def policy_update(
    policy: FlowPolicy,
    rollout: Rollout,
    objective: Objective,
    prepared: Prepared,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    inner_epochs: int = 1,
    minibatches: int = 1,
    parent_chunk: int = 64,
    grad_clip: float | None = None,
) -> dict[str, float]:
    """``inner_epochs`` passes over the rollout, each split into ``minibatches`` optimizer steps by group.

    The old policy is the rollout policy throughout (its log-probs were stored at sampling time).
    """
    groups = torch.arange(rollout.num_groups)
    n_mb = max(1, min(minibatches, rollout.num_groups))
    sums: dict[str, float] = {}
    count, kl_max = 0, 0.0
    for _ in range(inner_epochs):
        for mb_groups in torch.tensor_split(groups, n_mb):
            optimizer.zero_grad(set_to_none=True)
            mb = Minibatch.of_groups(rollout, mb_groups)
            stats = minibatch_gradient(policy, rollout, objective, prepared, mb, parent_chunk)
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
            if not torch.isfinite(norm):
                raise FloatingPointError(f"non-finite gradient norm ({float(norm)}); lower trainer.lr or check the reward scale")
            optimizer.step()
            stats["grad_norm"] = norm.detach()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            kl_max = max(kl_max, float(stats["kl_ref"]))
            count += 1
    out = {k: v / count for k, v in sums.items()}
    out["kl_ref_max"] = kl_max  # the largest per-optimizer-step KL (GARDO's reset rule reads it)
    return out
