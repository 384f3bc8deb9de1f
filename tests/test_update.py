"""The two-pass edge-level update computes the exact gradient of loss + KL (vs one big autograd graph)."""

import pytest
import torch

from tmpo.objectives import GRPOObjective, Minibatch, SoftmaxTBObjective
from tmpo.samplers import DynamicTreePlan, FlowSampler, IndependentPlan, edge_log_probs, recompute_means
from tmpo.sde import gaussian_kl_equal_std
from tmpo.update import kl_parent_weights, minibatch_gradient


def direct_gradient(policy, rollout, objective, prepared, mb):
    """Reference: everything in one graph, no coefficient trick."""
    parents = torch.unique(rollout.edge_parent[mb.edge_ids])
    means = recompute_means(policy, rollout, parents)
    _, lp = edge_log_probs(rollout, parents, means)
    bias = gaussian_kl_equal_std(means.detach(), rollout.parent_mean_old[parents], rollout.parent_std[parents])
    local = torch.full((rollout.parent_x.shape[0],), -1, dtype=torch.long)
    local[parents] = torch.arange(parents.numel())
    loss, _ = objective.loss(mb, lp, bias[local[rollout.edge_parent[mb.edge_ids]]], prepared)
    with torch.no_grad(), policy.reference():
        ref = recompute_means(policy, rollout, parents)
    kl = gaussian_kl_equal_std(means, ref, rollout.parent_std[parents])
    w = kl_parent_weights(rollout, mb, prepared.kl_leaf_weight, parents)
    (loss + objective.kl_coef * (w * kl).sum()).backward()


@pytest.mark.parametrize(
    "objective, plan",
    [
        (SoftmaxTBObjective(kl_coef=0.5), DynamicTreePlan()),
        (GRPOObjective(kl_coef=0.5), IndependentPlan(group_size=6)),
        (GRPOObjective(kl_coef=0.5), DynamicTreePlan()),
    ],
)
def test_two_pass_gradient_equals_direct_gradient(toy_policy, objective, plan):
    policy = toy_policy
    sampler = FlowSampler(plan, 6, 0.7, "cps" if isinstance(plan, DynamicTreePlan) else "sde")
    rollout = sampler.rollout(policy, ["toy"] * 2, [{}] * 2, 3, 10, torch.Generator().manual_seed(1))
    # move the policy off the rollout policy so ratios, clipping, RatioNorm and the KL are all active
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    rewards = torch.rand(rollout.leaves.shape[0], generator=torch.Generator().manual_seed(2))
    prepared = objective.prepare(rollout, rewards, step=3)
    mb = Minibatch.of_groups(rollout, torch.arange(2))
    params = [p for _, p in policy.trainable_named_parameters()]

    for p in params:
        p.grad = None
    stats = minibatch_gradient(policy, rollout, objective, prepared, mb, parent_chunk=5)
    two_pass = [p.grad.clone() for p in params]
    assert stats["kl_ref"] > 0 and stats["log_prob_drift"] > 0
    for p in params:
        p.grad = None
    direct_gradient(policy, rollout, objective, prepared, mb)
    for a, b in zip(two_pass, [p.grad for p in params]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_kl_weights_are_a_mean_over_leaves_of_path_means(toy_policy):
    sampler = FlowSampler(IndependentPlan(group_size=4), 6, 0.7, "sde")
    r = sampler.rollout(toy_policy, ["toy"], [{}], 0, 10, torch.Generator().manual_seed(0))
    mb = Minibatch.of_groups(r, torch.arange(1))
    parents = torch.unique(r.edge_parent)
    w = kl_parent_weights(r, mb, None, parents)
    model = ~r.parent_is_prior[parents]
    assert torch.allclose(w[model], torch.full_like(w[model], 1 / (4 * 5)))  # 4 leaves x 5 trained steps
    assert torch.all(w[~model] == 0) and w.sum().item() == pytest.approx(1.0)
    flagged = torch.tensor([1.0, 0.0, 0.0, 0.0])
    w1 = kl_parent_weights(r, mb, flagged, parents)
    assert w1.sum().item() == pytest.approx(1.0) and int((w1 > 0).sum()) == 5
    assert kl_parent_weights(r, mb, torch.zeros(4), parents).sum().item() == 0.0
