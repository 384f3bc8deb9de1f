"""The policy update shared by every method: an exact edge-level gradient in two passes.

Any objective here is a function of the stored edges' log-probs ``l_e(theta)`` (plus a detached
RatioNorm bias). Its gradient is ``sum_e (dL/dl_e) * grad l_e``. So:

1. *pass 1* (no grad): get ``l_e`` for all edges of the minibatch, evaluate the objective on a leaf
   copy of ``l`` and read off ``g_e = dL/dl_e``. In the first optimizer step after a rollout the
   parameters are the rollout's, so ``l_e`` is the stored ``log pi_old`` and the RatioNorm bias is 0:
   pass 1 needs no network call. Later steps recompute every parent's mean once, without grad.
2. *pass 2* (grad): in chunks of parent states, recompute the means with grad and back-propagate
   ``sum_e g_e l_e`` (+ the KL-to-reference term, against reference means computed once per rollout).

A stored transition's grad-forward and backward run once per optimizer step, whatever the number of
leaves sharing it, and siblings share their parent's forward. Memory is bounded by the chunk size,
and the gradient is the exact gradient of the loss (not an approximation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tmpo.distributed import Processes
from tmpo.objectives.base import Minibatch, Objective, Prepared
from tmpo.policies.base import FlowPolicy
from tmpo.samplers.rollout import Rollout
from tmpo.samplers.sampler import recompute_means
from tmpo.sde import gaussian_kl_equal_std, reference_kl, transition_log_prob

MINIBATCH_SPLITS = ("groups", "leaves", "group_leaves")


def kl_parent_weights(rollout: Rollout, mb: Minibatch, leaf_weight: Tensor | None, parent_ids: Tensor,
                      processes: Processes | None = None, edge_rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weights of each parent's KL term so that the KL penalty is the (leaf-weighted) mean over leaves of
    the mean KL along each leaf's stored, trainable steps, and the share of the minibatch's leaves that
    carry weight.

    Returns ``(weights [len(parent_ids)], weighted_share [])``: the weights sum to 1 (or 0 if every leaf
    weight is 0, e.g. GARDO's gate flagged nothing); ``weighted_share = sum(w) / n_leaves`` turns the
    penalty (a mean over weighted leaves) into a mean over *all* leaves with zeros for unweighted ones.

    With several ``processes`` the mean is over the global minibatch (every process's part of it): the
    weights are normalised by the global weight total and multiplied by the number of processes, which
    DDP's gradient average divides out again; they sum to ``W * (local total / global total)``.
    ``edge_rows``: each minibatch edge's row in ``parent_ids`` (computed here when not given).
    """
    trainable = (~mb.edge_is_prior).to(mb.path.dtype)
    path = mb.path * trainable[None, :]
    steps = path.sum(dim=1).clamp(min=1.0)
    dev = path.device
    w = torch.ones(mb.leaf_ids.numel(), dtype=path.dtype, device=dev) if leaf_weight is None else leaf_weight[mb.leaf_ids].to(path.dtype)
    total = w.sum()
    n_leaves = mb.leaf_ids.numel()
    if processes is not None and processes.distributed:
        total = processes.sum(total)
        n_leaves = int(processes.sum(torch.tensor(n_leaves)))
        w = w * processes.world_size
    edge_w = (w / steps) @ path / total if total > 0 else torch.zeros(path.shape[1], dtype=path.dtype, device=dev)
    out = torch.zeros(parent_ids.numel(), dtype=path.dtype, device=dev)
    if edge_rows is None:
        edge_rows = _local_index(rollout, parent_ids)[rollout.edge_parent[mb.edge_ids]]
    out.index_add_(0, edge_rows, edge_w)
    return out, total / max(n_leaves, 1)


def _local_index(rollout: Rollout, parent_ids: Tensor) -> Tensor:
    """``[P]`` map from a global parent id to its row in ``parent_ids`` (-1 if absent)."""
    local = torch.full((rollout.parent_x.shape[0],), -1, dtype=torch.long, device=parent_ids.device)
    local[parent_ids] = torch.arange(parent_ids.numel(), device=parent_ids.device)
    return local


def _chunks(ids: Tensor, size: int) -> list[Tensor]:
    return list(torch.split(ids, max(int(size), 1)))


def split_minibatches(rollout: Rollout, n: int, split: str, generator: torch.Generator | None = None) -> list[Minibatch]:
    """One pass over the rollout as ``n`` minibatches (one optimizer step each).

    * ``"groups"``: whole groups (prompts) per minibatch, in order; a tree's shared edges stay in one step.
    * ``"leaves"``: a random permutation of all leaves cut into ``n`` (Flow-GRPO's and GARDO's code
      shuffle the samples of an epoch and step twice over them).
    * ``"group_leaves"``: every minibatch holds a random ``1/n`` of each group's leaves (MixGRPO's code:
      each GPU holds one prompt's samples and steps after every few of them, gradients averaged over GPUs).
    """
    if split not in MINIBATCH_SPLITS:
        raise ValueError(f"trainer.minibatch_split={split!r} is not a split; valid options: {', '.join(MINIBATCH_SPLITS)}")
    if n < 1:
        raise ValueError(f"trainer.minibatches must be >= 1, got {n}")
    dev = rollout.group.device  # splits are drawn on the CPU generator, then indexed on the rollout's device
    if split == "groups":
        n = min(n, rollout.num_groups)
        return [Minibatch.of_groups(rollout, g.to(dev)) for g in torch.tensor_split(torch.arange(rollout.num_groups), n)]
    n_leaves = rollout.leaves.shape[0]
    if split == "leaves":
        n = min(n, n_leaves)
        parts = torch.tensor_split(torch.randperm(n_leaves, generator=generator), n)
        return [Minibatch.of_leaves(rollout, ids.to(dev)) for ids in parts]
    k = rollout.group_size
    n = min(n, k)
    per_group = [torch.tensor_split(g * k + torch.randperm(k, generator=generator), n) for g in range(rollout.num_groups)]
    return [Minibatch.of_leaves(rollout, torch.cat([parts[i] for parts in per_group]).to(dev)) for i in range(n)]


@torch.no_grad()
def reference_means(policy: FlowPolicy, rollout: Rollout, parent_chunk: int) -> Tensor:
    """The reference policy's transition means at every stored parent, ``[P, *S]``.

    They do not change during an iteration (GARDO's reset swaps the reference only between
    iterations), so the update computes them once per rollout, not once per optimizer step."""
    every_parent = torch.arange(rollout.parent_x.shape[0], device=rollout.edge_parent.device)
    with policy.reference():
        return torch.cat([recompute_means(policy, rollout, c) for c in _chunks(every_parent, parent_chunk)])


def _pass_one(policy: FlowPolicy, rollout: Rollout, mb: Minibatch, parent_ids: Tensor, edge_rows: Tensor,
              parent_chunk: int, fresh: bool) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Edge log-probs ``[e]`` and RatioNorm biases ``[e]`` of the minibatch under the current parameters."""
    if fresh:  # parameters are the rollout's: the stored values are exact, no network call needed
        return mb.log_prob_old, torch.zeros_like(mb.log_prob_old), {"fwd_nograd": torch.tensor(0.0)}
    with torch.no_grad():
        means = torch.cat([recompute_means(policy, rollout, c) for c in _chunks(parent_ids, parent_chunk)])
    parents = rollout.edge_parent[mb.edge_ids]
    log_prob = transition_log_prob(rollout.edge_x_next[mb.edge_ids], means[edge_rows], rollout.parent_std[parents])
    parent_bias = gaussian_kl_equal_std(means, rollout.parent_mean_old[parent_ids], rollout.parent_std[parent_ids])
    n_model = float((~rollout.parent_is_prior[parent_ids]).sum())
    stats = {"log_prob_drift": (log_prob - mb.log_prob_old).abs().max(), "fwd_nograd": torch.tensor(n_model)}
    return log_prob, parent_bias[edge_rows], stats


def minibatch_gradient(
    policy: FlowPolicy,
    rollout: Rollout,
    objective: Objective,
    prepared: Prepared,
    mb: Minibatch,
    parent_chunk: int,
    fresh: bool = False,
    ref_means: Tensor | None = None,
    processes: Processes | None = None,
) -> dict[str, Tensor]:
    """Accumulate ``d(loss)/d(theta)`` of one minibatch into ``.grad`` (two passes, see module doc).

    ``fresh=True`` asserts that the parameters are still the rollout's (first step after it).
    ``ref_means`` are the reference means at every stored parent (:func:`reference_means`); needed
    when ``objective.kl_coef > 0``. With several ``processes`` every chunk's forward and backward run
    through their gradient wrapper, and only the last chunk's backward communicates (``no_sync`` before).
    """
    processes = processes or Processes()
    parent_ids = torch.unique(rollout.edge_parent[mb.edge_ids])
    edge_rows = _local_index(rollout, parent_ids)[rollout.edge_parent[mb.edge_ids]]  # [e] row in parent_ids
    log_prob, edge_bias, stats = _pass_one(policy, rollout, mb, parent_ids, edge_rows, parent_chunk, fresh)
    lp = log_prob.detach().clone().requires_grad_(True)
    loss, loss_stats = objective.loss(mb, lp, edge_bias, prepared)
    loss.backward()  # also fills .grad of any parameters the objective owns
    coef = lp.grad.detach()

    use_kl = objective.kl_coef > 0
    if use_kl and ref_means is None:
        raise ValueError("objective.kl_coef > 0 needs the reference means (update.reference_means)")
    kl_w, weighted_share = (kl_parent_weights(rollout, mb, prepared.kl_leaf_weight, parent_ids, processes, edge_rows)
                            if use_kl else (None, 0.0))
    kl_total = torch.zeros((), device=lp.device)
    model_rows = torch.nonzero(~rollout.parent_is_prior[parent_ids]).squeeze(1)
    chunks = _chunks(model_rows, parent_chunk)
    for i, rows in enumerate(chunks):
        with processes.backward(policy, last=i == len(chunks) - 1):
            ids = parent_ids[rows]
            chunk_pos = torch.full((parent_ids.numel(),), -1, dtype=torch.long, device=rows.device)
            chunk_pos[rows] = torch.arange(rows.numel(), device=rows.device)
            sel = torch.nonzero(chunk_pos[edge_rows] >= 0).squeeze(1)  # minibatch edges whose parent is in this chunk
            means_c = recompute_means(policy, rollout, ids)
            e_ids = mb.edge_ids[sel]
            lp_c = transition_log_prob(rollout.edge_x_next[e_ids], means_c[chunk_pos[edge_rows[sel]]], rollout.parent_std[rollout.edge_parent[e_ids]])
            surrogate = (coef[sel] * lp_c).sum()
            if use_kl:
                kl = reference_kl(means_c, ref_means[ids], rollout.parent_std[ids], rollout.parent_sigma[ids],
                                  rollout.parent_sigma_next[ids], rollout.noise, objective.kl_form)
                kl_term = (kl_w[rows].to(kl.dtype) * kl).sum()
                surrogate = surrogate + objective.kl_coef * kl_term
                kl_total = kl_total + kl_term.detach()
            surrogate.backward()
    stats.update(loss_stats)
    stats["loss"] = loss.detach()
    stats["kl_ref"] = kl_total  # the penalty: mean over the KL-weighted leaves
    stats["kl_ref_all"] = kl_total * weighted_share  # the same averaged over all leaves, zeros included
    stats["fwd_grad"] = torch.tensor(float(model_rows.numel()))
    return stats


# how each per-step statistic is reduced over the iteration's optimizer steps (default: mean)
_SUMMED = ("fwd_nograd", "fwd_grad")
_MAXED = ("log_ratio_absmax", "log_prob_drift")
_ALSO_MAX = ("kl_ref", "kl_ref_all")  # mean and "<name>_max" (GARDO's reset reads the largest)


def _reduce(per_step: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in {k for s in per_step for k in s}:
        values = [s[key] for s in per_step if key in s]
        if key in _SUMMED:
            out[key] = sum(values)
        elif key in _MAXED:
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
        if key in _ALSO_MAX:
            out[f"{key}_max"] = max(values)
    return out


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
    minibatch_split: str = "groups",
    generator: torch.Generator | None = None,
    processes: Processes | None = None,
) -> dict[str, float]:
    """``inner_epochs`` passes over the rollout, each split into ``minibatches`` optimizer steps
    (:func:`split_minibatches`; ``generator`` draws the leaf splits).

    The old policy is the rollout policy throughout (its log-probs were stored at sampling time).
    Returns per-iteration statistics: means over optimizer steps, the largest ``|log ratio|`` and
    log-prob drift, ``kl_ref_max``/``kl_ref_all_max``, and the number of parent forwards without
    (``fwd_nograd``) and with grad (``fwd_grad``) and of the reference (``fwd_ref``).

    With several ``processes`` (:mod:`tmpo.distributed`) each holds whole groups of the rollout; the
    gradients are averaged over processes before clipping and the statistics are global (forward counts
    summed over processes, maxima over them, means of the per-process means).
    """
    processes = processes or Processes()
    own = list(getattr(objective, "parameters", lambda: [])())  # outside the policy network's gradient sync
    ref_means = reference_means(policy, rollout, parent_chunk) if objective.kl_coef > 0 else None
    per_step: list[dict[str, float]] = []
    for _ in range(inner_epochs):
        for mb in split_minibatches(rollout, minibatches, minibatch_split, generator):
            optimizer.zero_grad(set_to_none=True)
            stats = minibatch_gradient(policy, rollout, objective, prepared, mb, parent_chunk,
                                       fresh=not per_step, ref_means=ref_means, processes=processes)
            processes.reduce_grads(own)
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
            if not torch.isfinite(norm):
                raise FloatingPointError(f"non-finite gradient norm ({float(norm)}); lower trainer.lr or check the reward scale")
            optimizer.step()
            stats["grad_norm"] = norm.detach()
            per_step.append({k: float(v) for k, v in stats.items()})
    out = _reduce(processes.reduce_steps(per_step, _SUMMED, _MAXED))
    out["optimizer_steps"] = float(len(per_step))
    out["fwd_ref"] = float(processes.sum((~rollout.parent_is_prior).sum())) if ref_means is not None else 0.0
    return out
