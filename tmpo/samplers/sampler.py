"""Executes a rollout plan for a batch of prompts: ODE between stochastic steps, branching, storage."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tmpo.likelihood import LeafLikelihood, log_density
from tmpo.policies.base import FlowPolicy
from tmpo.samplers.plans import Plan, RolloutPlan
from tmpo.samplers.rollout import Rollout
from tmpo.sde import sde_mean_std, transition_log_prob
from tmpo.seeding import GroupGenerators, plan_generator, standard_normal


class _Store:
    """Accumulates parents and edges while the rollout runs."""

    def __init__(self) -> None:
        self.parents: dict[str, list[Tensor]] = {k: [] for k in ("x", "sigma", "sigma_next", "step", "group", "mean", "std", "prior")}
        self.edge_parent: list[Tensor] = []
        self.edge_x_next: list[Tensor] = []
        self.edge_lp: list[Tensor] = []
        self.n_parents = 0
        self.n_edges = 0

    def add(self, x, sigma, sigma_next, step, group, mean, std, prior, children, branch) -> Tensor:
        """Store ``n`` parents and their ``n*branch`` children; return the new edges' ids ``[n*branch]``."""
        n = x.shape[0]
        for k, v in zip(self.parents, (x, sigma, sigma_next, step, group, mean, std, prior)):
            self.parents[k].append(v)
        parent_ids = torch.arange(self.n_parents, self.n_parents + n).repeat_interleave(branch)
        rep_mean = mean.repeat_interleave(branch, dim=0)
        rep_std = std.repeat_interleave(branch, dim=0)
        self.edge_parent.append(parent_ids)
        self.edge_x_next.append(children)
        self.edge_lp.append(transition_log_prob(children, rep_mean, rep_std))
        ids = torch.arange(self.n_edges, self.n_edges + n * branch)
        self.n_parents += n
        self.n_edges += n * branch
        return ids


class FlowSampler:
    """Runs a :class:`~tmpo.samplers.plans.Plan` on any :class:`~tmpo.policies.base.FlowPolicy`.

    Args:
        plan: decides stochastic steps, branching and storage per iteration.
        num_steps: training denoising horizon (paper: 6).
        eta: noise coefficient (paper: 0.7).
        noise: ``"cps"`` (default, what the paper's experiments ran) or ``"sde"``.
        leaf_likelihood: ``None`` (off) or the settings of :class:`tmpo.likelihood.LeafLikelihood`
            (``ode_steps``, ``probes``, ``exact``, ``solver``, ``chunk``): then every rollout also stores
            each leaf's marginal ``log p_old(x_0 | prompt)`` under the rollout policy
            (``Rollout.leaf_log_density``), for ``objective.policy_term=marginal``.
    """

    def __init__(self, plan: Plan, num_steps: int = 6, eta: float = 0.7, noise: str = "cps",
                 leaf_likelihood: dict | None = None) -> None:
        self.plan = plan
        self.num_steps = num_steps
        self.eta = eta
        self.noise = noise
        self.leaf_likelihood = None if leaf_likelihood is None else LeafLikelihood.from_config(leaf_likelihood)

    def make_plan(self, step: int, total_steps: int, generator: torch.Generator) -> RolloutPlan:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return self.plan.make(step, total_steps, self.num_steps, np.random.default_rng(seed))

    @torch.no_grad()
    def rollout(
        self,
        policy: FlowPolicy,
        prompts: list[str],
        metadata: list[dict],
        step: int,
        total_steps: int,
        generator: torch.Generator | GroupGenerators,
    ) -> Rollout:
        """Sample ``K`` leaves per prompt following this iteration's plan.

        ``generator``: one generator for the whole batch, or :class:`tmpo.seeding.GroupGenerators` (one
        stream per prompt group, the plan from its shared stream): then a group's rollout is the same
        whichever groups share the batch, which is what lets processes split a batch by groups."""
        if isinstance(generator, GroupGenerators) and len(generator.groups) != len(prompts):
            raise ValueError(f"{len(generator.groups)} group generators for {len(prompts)} prompts")
        if isinstance(generator, GroupGenerators) and self.leaf_likelihood is not None:
            raise ValueError("sampler.leaf_likelihood draws its probes for the whole batch: it cannot run with "
                             "trainer.noise_seeding=group (or more than one process); use one process and noise_seeding=batch")
        plan = self.make_plan(step, total_steps, plan_generator(generator))
        dev, dtype = policy.device, policy.dtype
        sigmas = policy.sigmas(self.num_steps).to(dev, dtype)
        cond = policy.encode_prompts(prompts)
        n_groups = len(prompts)
        shape = tuple(policy.latent_shape)
        x = standard_normal(generator, (n_groups * plan.n_roots, *shape), dtype).to(dev)
        group = torch.arange(n_groups).repeat_interleave(plan.n_roots)
        store = _Store()
        paths: list[list[int]] = [[] for _ in range(x.shape[0])]
        if plan.n_roots > 1:
            zeros = torch.zeros((n_groups, *shape), dtype=dtype, device=dev)
            ids = store.add(
                zeros, torch.ones(n_groups), torch.ones(n_groups), torch.zeros(n_groups, dtype=torch.long),
                torch.arange(n_groups), zeros, torch.ones(n_groups, dtype=dtype, device=dev),
                torch.ones(n_groups, dtype=torch.bool), x, plan.n_roots,
            )
            paths = [[int(e)] for e in ids]
        nfe = 0
        for s, sp in enumerate(plan.steps, start=1):
            n = x.shape[0]
            sig = sigmas[s - 1].expand(n)
            sig_next = sigmas[s].expand(n)
            v = policy.velocity(x, sig, cond, group.to(dev))
            nfe += n // n_groups
            if not sp.stochastic:
                x = x + v * (sigmas[s] - sigmas[s - 1])
                continue
            mean, std = sde_mean_std(x, v, sig, sig_next, self.eta, self.noise)
            if bool((std <= 0).any()):
                raise ValueError(
                    f"step {s} is stochastic but its noise std is 0 (noise={self.noise}, sigma_next={float(sigmas[s])}); "
                    "no branch or SDE step can sit on a zero-noise transition: lower s_max / sde_steps"
                )
            b = sp.branch
            eps = standard_normal(generator, (n * b, *shape), dtype).to(dev)
            children = mean.repeat_interleave(b, dim=0) + std.repeat_interleave(b).view(-1, *[1] * len(shape)) * eps
            if sp.store:
                ids = store.add(
                    x, sig.cpu(), sig_next.cpu(), torch.full((n,), s), group, mean, std, torch.zeros(n, dtype=torch.bool), children, b
                )
                paths = [paths[i // b] + [int(ids[i])] for i in range(n * b)]
            else:
                paths = [paths[i // b] for i in range(n * b)]
            group = group.repeat_interleave(b)
            x = children
        rollout = self._assemble(plan, prompts, metadata, cond, x, group, store, paths, nfe)
        if self.leaf_likelihood is not None:
            self._store_leaf_log_density(policy, rollout, generator)
        return rollout

    def _store_leaf_log_density(self, policy: FlowPolicy, rollout: Rollout, generator: torch.Generator) -> None:
        """``log p_old(x_0 | prompt)`` of every leaf under the rollout policy (the parameters that just
        sampled it), each leaf's flow conditioned on its group's prompt; probes come from the rollout's
        generator after all sampling, so the leaves are the same with the likelihood on or off."""
        t0 = time.perf_counter()
        group = rollout.group.to(policy.device)

        def velocity(x: Tensor, sigma: Tensor, rows: Tensor) -> Tensor:
            return policy.velocity(x, sigma, rollout.cond, group[rows])

        out = log_density(velocity, rollout.leaves.to(policy.device), self.leaf_likelihood, generator, policy.dtype)
        rollout.leaf_log_density = out.log_density.to(rollout.leaves.device)
        rollout.info["leaf_likelihood_s"] = time.perf_counter() - t0
        rollout.info["leaf_likelihood_evals_per_leaf"] = self.leaf_likelihood.evaluations_per_sample(rollout.latent_dim)

    def _assemble(self, plan, prompts, metadata, cond, leaves, group, store, paths, nfe) -> Rollout:
        if store.n_edges == 0:
            raise ValueError("the rollout plan stores no transitions: nothing to train (check sde/train steps)")
        path = torch.zeros((leaves.shape[0], store.n_edges), dtype=leaves.dtype)
        for leaf, edge_ids in enumerate(paths):
            path[leaf, edge_ids] = 1.0
        p = store.parents
        cat = lambda k: torch.cat([t.to(leaves.device) for t in p[k]])  # noqa: E731
        return Rollout(
            prompts=list(prompts), metadata=list(metadata), cond=cond, leaves=leaves, group=group.to(leaves.device),
            group_size=plan.group_size, parent_x=cat("x"), parent_sigma=cat("sigma").to(leaves.dtype),
            parent_sigma_next=cat("sigma_next").to(leaves.dtype), parent_step=cat("step"), parent_group=cat("group"),
            parent_mean_old=cat("mean"), parent_std=cat("std"), parent_is_prior=cat("prior"),
            edge_parent=torch.cat(store.edge_parent).to(leaves.device), edge_x_next=torch.cat(store.edge_x_next),
            edge_log_prob_old=torch.cat(store.edge_lp), path=path.to(leaves.device), eta=self.eta, noise=self.noise,
            nfe=nfe, info={"stored_steps": plan.stored_steps, "n_roots": plan.n_roots},
        )


def recompute_means(policy: FlowPolicy, rollout: Rollout, parent_ids: Tensor) -> Tensor:
    """Transition means of the given stored parents under the policy's *current* parameters.

    Uses exactly the stored inputs (state, sigma, sigma_next, prompt) of each transition, so with
    unchanged parameters it reproduces the rollout's means (official-code-notes D1). Prior parents
    have mean 0 and need no model call. Gradients flow if enabled by the caller.
    """
    prior = rollout.parent_is_prior[parent_ids]
    out = torch.zeros_like(rollout.parent_mean_old[parent_ids])
    model_ids = parent_ids[~prior]
    if model_ids.numel() == 0:
        return out
    x = rollout.parent_x[model_ids]
    sig, sig_next = rollout.parent_sigma[model_ids], rollout.parent_sigma_next[model_ids]
    v = policy.velocity(x, sig, rollout.cond, rollout.parent_group[model_ids])
    mean, _ = sde_mean_std(x, v, sig, sig_next, rollout.eta, rollout.noise)
    out[~prior] = mean
    return out


def edge_log_probs(rollout: Rollout, parent_ids: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probs of all stored edges whose parent is in ``parent_ids``, given those parents' means.

    Returns ``(edge_ids [e], log_probs [e])``.
    """
    local = torch.full((rollout.parent_x.shape[0],), -1, dtype=torch.long, device=parent_ids.device)
    local[parent_ids] = torch.arange(parent_ids.numel(), device=parent_ids.device)
    edge_ids = torch.nonzero(local[rollout.edge_parent] >= 0).squeeze(1)
    rows = local[rollout.edge_parent[edge_ids]]
    lp = transition_log_prob(rollout.edge_x_next[edge_ids], means[rows], rollout.parent_std[rollout.edge_parent[edge_ids]])
    return edge_ids, lp


@torch.no_grad()
def sample_ode(
    policy: FlowPolicy, prompts: list[str], n_per_prompt: int, num_steps: int, generator: torch.Generator,
    progress: bool = False, shard: slice | None = None, batch_size: int | None = None,
) -> Tensor:
    """Deterministic Euler sampling (evaluation): ``n_per_prompt`` samples per prompt, ``[G*n, *S]``.

    ``shard``: sample only the prompts ``prompts[shard]`` (a process's part of an evaluation), from the
    same initial noises the whole set draws (all ``G*n`` are drawn, the shard's rows kept), ``[len*n, *S]``.
    ``batch_size``: integrate at most this many samples at a time (memory bound at real scale; ``None`` =
    all at once). The initial noises are drawn before the split, so the samples do not depend on it."""
    dev, dtype = policy.device, policy.dtype
    sigmas = policy.sigmas(num_steps).to(dev, dtype)
    x = torch.randn((len(prompts) * n_per_prompt, *policy.latent_shape), generator=generator, dtype=dtype)
    if shard is not None:
        start, stop, _ = shard.indices(len(prompts))
        prompts, x = prompts[start:stop], x[start * n_per_prompt: stop * n_per_prompt]
    cond = policy.encode_prompts(prompts)
    group = torch.arange(len(prompts)).repeat_interleave(n_per_prompt).to(dev)
    size = x.shape[0] if batch_size is None else batch_size
    out = []
    for rows in torch.arange(x.shape[0]).split(max(size, 1)):
        xb, gb = x[rows].to(dev), group[rows.to(dev)]
        for s in tqdm(range(1, num_steps + 1), desc="eval", leave=False, disable=not progress):
            v = policy.velocity(xb, sigmas[s - 1].expand(xb.shape[0]), cond, gb)
            xb = xb + v * (sigmas[s] - sigmas[s - 1])
        out.append(xb)
    return torch.cat(out)
