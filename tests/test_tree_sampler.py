"""Tree shape, NFE count, leaf distinctness and exact recomputation of every stored edge."""

import pytest
import torch

from tmpo.samplers import DynamicTreePlan, FlowSampler, IndependentPlan, recompute_means, edge_log_probs, tree_plan
from tmpo.samplers.plans import Plan


class FixedPlan(Plan):
    def __init__(self, plan):
        self.plan = plan

    def make(self, step, total_steps, num_steps, rng):
        return self.plan


def roll(policy, plan, noise="cps", prompts=2, seed=0, num_steps=6, eta=0.7):
    sampler = FlowSampler(FixedPlan(plan) if not isinstance(plan, Plan) else plan, num_steps=num_steps, eta=eta, noise=noise)
    return sampler.rollout(policy, ["toy"] * prompts, [{}] * prompts, 0, 10, torch.Generator().manual_seed(seed))


def expected_nfe(positions, branch, num_steps):
    """Velocity calls per prompt: each step evaluates every distinct state alive at its start."""
    nodes = branch if 1 in positions else 1
    total = 0
    for s in range(1, num_steps + 1):
        total += nodes
        if s in positions and s != 1:
            nodes *= branch
    return total


@pytest.mark.parametrize("positions", [(2, 3, 4), (1, 3, 5), (1, 2, 3), (3, 4, 5)])
def test_tree_shape_edges_and_nfe(toy_policy, positions):
    r = roll(toy_policy, tree_plan(positions, 3, 6))
    g = 2
    assert r.leaves.shape == (g * 27, 2) and r.group_size == 27
    assert r.edge_x_next.shape[0] == g * (3 + 9 + 27)  # each edge stored once: 39, not 81
    assert r.parent_x.shape[0] == g * (1 + 3 + 9)  # siblings share one parent record
    assert torch.all(r.path.sum(dim=1) == 3)  # T = 3 stochastic choices per leaf
    assert r.nfe == expected_nfe(positions, 3, 6)
    assert r.nfe == {(2, 3, 4): 1 + 1 + 3 + 9 + 27 + 27, (1, 3, 5): 3 + 3 + 3 + 9 + 9 + 27}.get(positions, r.nfe)
    # every leaf of a group shares the first edge with 8 others, the second with 2 others
    counts = r.path.sum(dim=0)
    assert sorted(set(counts.tolist())) == [1.0, 3.0, 9.0]
    assert (r.group.view(g, 27) == torch.arange(g)[:, None]).all()


def test_branch_at_step_one_is_three_independent_initial_noises(toy_policy):
    r = roll(toy_policy, tree_plan((1, 3, 5), 3, 6))
    prior = r.parent_is_prior
    assert int(prior.sum()) == 2  # one prior parent per prompt
    assert int(r.edge_is_prior.sum()) == 6  # B = 3 initial noises per prompt
    assert torch.all(r.parent_step[~prior] > 1)  # step 1 itself is an ODE step


def test_all_leaves_distinct_under_dynamic_schedule(toy_policy):
    sampler = FlowSampler(DynamicTreePlan(), num_steps=6, eta=0.7, noise="cps")
    for step in range(0, 100, 7):
        r = sampler.rollout(toy_policy, ["toy"], [{}], step, 100, torch.Generator().manual_seed(step))
        d = torch.cdist(r.leaves, r.leaves) + torch.eye(27) * 1e9
        assert d.min() > 1e-6, f"identical leaves at step {step}: {r.info}"
        assert r.edge_x_next.shape[0] == 39 and r.group_size == 27


def test_branch_on_a_zero_noise_transition_is_refused(toy_policy):
    # CPS noise is zero at the last step (sigma_next = 0): children split there would be identical
    with pytest.raises(ValueError, match="noise std is 0"):
        roll(toy_policy, tree_plan((2, 4, 6), 3, 6), noise="cps")


@pytest.mark.parametrize("noise", ["cps", "sde"])
def test_recomputing_each_stored_edge_reproduces_its_log_prob(toy_policy, noise):
    r = roll(toy_policy, tree_plan((1, 3, 5), 3, 6), noise=noise, prompts=3)
    with torch.no_grad():
        all_parents = torch.arange(r.parent_x.shape[0])
        means = recompute_means(toy_policy, r, all_parents)
        ids, lp = edge_log_probs(r, all_parents, means)
        assert torch.equal(ids, torch.arange(r.edge_x_next.shape[0]))
        # Same inputs, different batch composition than the rollout's per-step batches: the CPU
        # kernels may round float32 differently (bitwise equal on some CPUs, ~1 ulp on others).
        assert torch.allclose(means, r.parent_mean_old, atol=2e-6, rtol=0)
        assert torch.allclose(lp, r.edge_log_prob_old, atol=1e-5, rtol=0)
        # one parent at a time: the same inputs (sigma, sigma_next, prompt) per edge; only float32
        # rounding of a different batch size remains (~1e-7 in the mean, amplified by 1/std^2)
        for p in all_parents.tolist():
            one = torch.tensor([p])
            e, lp1 = edge_log_probs(r, one, recompute_means(toy_policy, r, one))
            assert torch.allclose(lp1, r.edge_log_prob_old[e], atol=1e-4, rtol=0)


def test_independent_plan_flow_grpo_layout(toy_policy):
    plan = IndependentPlan(group_size=5, sde_steps=None, train_steps=None)
    r = roll(toy_policy, plan, noise="sde", prompts=2)
    assert r.group_size == 5 and r.nfe == 5 * 6
    assert r.info["stored_steps"] == [1, 2, 3, 4, 5]  # all SDE steps but the last are trained
    # 5 prior edges (independent x_T) + 5 leaves x 5 steps, per prompt
    assert r.edge_x_next.shape[0] == 2 * (5 + 25)
    assert torch.all(r.path.sum(dim=1) == 6)


def test_same_initial_noise_splits_at_the_first_sde_step(toy_policy):
    plan = IndependentPlan(group_size=4, sde_steps=[3, 4], train_steps=[3, 4], same_initial_noise=True)
    r = roll(toy_policy, plan, prompts=1)
    assert int(r.parent_is_prior.sum()) == 0
    assert r.nfe == 1 + 1 + 1 + 4 + 4 + 4
    d = torch.cdist(r.leaves, r.leaves) + torch.eye(4) * 1e9
    assert d.min() > 1e-6


def test_independent_branch_schedule_mirrors_tree_positions(toy_policy):
    plan = IndependentPlan(group_size=27, sde_steps="branch_schedule", tree=DynamicTreePlan())
    r = FlowSampler(plan, 6, 0.7, "cps").rollout(toy_policy, ["toy"], [{}], 0, 10, torch.Generator().manual_seed(0))
    assert r.group_size == 27
    assert r.nfe == 27 * 6  # no prefix sharing
