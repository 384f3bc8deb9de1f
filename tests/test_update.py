"""The update's gradients against a naive per-leaf autograd reference that shares none of its code.

The reference below re-derives each leaf's stored edges from the rollout's documented edge order (one
block of edges per stored step, nodes in leaf order; not the path matrix), recomputes every edge's
transition mean separately for every leaf that uses it, writes the Gaussian log-density, the ratios,
the clipped surrogates, RatioNorm and the KL weights out by hand, and differentiates the whole
minibatch loss in one autograd graph. Several optimizer steps per rollout (so ratios move and clip),
minibatches that split groups and trees, prior (initial-noise) edges, small parent chunks, both noise
types and both KL forms, on the toy and on a tiny mini DiT.
"""

import math

import pytest
import torch

from tmpo.objectives import GRPOObjective, SoftmaxTBObjective
from tmpo.samplers import DynamicTreePlan, FlowSampler, IndependentPlan
from tmpo.sde import sde_mean_std
from tmpo.update import kl_parent_weights, policy_update
from tmpo.objectives.base import Minibatch


# --- the reference ------------------------------------------------------------------------------
def leaf_edges(rollout) -> list[list[int]]:
    """Each leaf's stored edges from the storage order: edges come in one contiguous block per stored
    step (prior edges first), the block's nodes in leaf order, so leaf l uses edge l // (L / n) of an
    n-edge block."""
    n_leaves = rollout.leaves.shape[0]
    steps = rollout.parent_step[rollout.edge_parent]
    out = [[] for _ in range(n_leaves)]
    for s in torch.unique(steps).tolist():
        ids = torch.nonzero(steps == s).squeeze(1).tolist()
        assert ids == list(range(ids[0], ids[0] + len(ids))), "edges of one step are stored contiguously"
        for leaf in range(n_leaves):
            out[leaf].append(ids[leaf // (n_leaves // len(ids))])
    return out


def log_density(x, mean, std):
    """Per-dim mean of log N(x; mean, std^2), written out."""
    d = x.numel()
    return (-((x - mean) ** 2).sum() / (2 * std**2) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)) / d


def edge_mean(policy, rollout, e, reference=False):
    p = int(rollout.edge_parent[e])
    if bool(rollout.parent_is_prior[p]):
        return torch.zeros_like(rollout.edge_x_next[e]), 1.0, True
    x, sig, nxt = rollout.parent_x[p : p + 1], rollout.parent_sigma[p : p + 1], rollout.parent_sigma_next[p : p + 1]
    if reference:
        with torch.no_grad(), policy.reference():
            v = policy.velocity(x, sig, rollout.cond, rollout.parent_group[p : p + 1])
    else:
        v = policy.velocity(x, sig, rollout.cond, rollout.parent_group[p : p + 1])
    mean, std = sde_mean_std(x, v, sig, nxt, rollout.eta, rollout.noise)
    return mean[0], float(std[0]), False


def naive_loss(policy, rollout, objective, leaf_adv, kl_weight, leaves, edges_of, clip):
    """Loss of one minibatch (a list of leaves), every leaf on its own."""
    tb = isinstance(objective, SoftmaxTBObjective)
    terms, kl_sum, w_sum = [], 0.0, 0.0
    for leaf in leaves:
        log_w, kls = 0.0, []
        for e in edges_of[leaf]:
            mean, std, prior = edge_mean(policy, rollout, e)
            lp = log_density(rollout.edge_x_next[e], mean, std)
            log_r = lp - rollout.edge_log_prob_old[e]
            if prior:
                continue
            p = int(rollout.edge_parent[e])
            if tb:  # trajectory ratio with RatioNorm: + ||mu - mu_old||^2 / (2 std^2 d), detached
                bias = ((mean.detach() - rollout.parent_mean_old[p]) ** 2).mean() / (2 * std**2)
                log_w = log_w + log_r + bias
            else:  # per-step ratio, one term per (leaf, step)
                r = torch.exp(log_r)
                terms.append(torch.minimum(r * leaf_adv[leaf], r.clamp(1 - clip, 1 + clip) * leaf_adv[leaf]))
            ref, _, _ = edge_mean(policy, rollout, e, reference=True)
            kl = ((mean - ref) ** 2).mean() / (2 * std**2)
            if objective.kl_form == "flow_grpo" and rollout.noise == "sde":
                kl = kl * float(rollout.parent_sigma[p] - rollout.parent_sigma_next[p])
            kls.append(kl)
        if tb:
            w = torch.exp(log_w)
            terms.append(torch.minimum(w * leaf_adv[leaf], w.clamp(1 - clip, 1 + clip) * leaf_adv[leaf]))
        kl_sum = kl_sum + kl_weight[leaf] * sum(kls) / len(kls)
        w_sum += float(kl_weight[leaf])
    loss = -sum(terms) / len(terms)
    return loss + objective.kl_coef * kl_sum / w_sum if w_sum > 0 else loss


def naive_splits(rollout, n, split, generator, epochs):
    g_count, k = rollout.num_groups, rollout.group_size
    out = []
    for _ in range(epochs):
        if split == "groups":
            out += [[l for gr in groups.tolist() for l in range(gr * k, gr * k + k)] for groups in torch.arange(g_count).tensor_split(n)]
        elif split == "leaves":
            out += [sorted(p.tolist()) for p in torch.randperm(g_count * k, generator=generator).tensor_split(n)]
        else:
            per = [(gr * k + torch.randperm(k, generator=generator)).tensor_split(n) for gr in range(g_count)]
            out += [sorted(torch.cat([parts[i] for parts in per]).tolist()) for i in range(n)]
    return out


class RecordingSGD(torch.optim.SGD):
    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


# --- the cases ----------------------------------------------------------------------------------
def toy_policy():
    from tmpo.policies.toy import ToyPolicy

    torch.manual_seed(0)
    return ToyPolicy()


def mini_policy():
    from tmpo.policies.mini import MiniPolicy

    policy = MiniPolicy(arch="dit", random_init=True, model_config={"width": 32, "depth": 1, "heads": 2},
                        lora={"r": 4, "alpha": 8, "target_modules": ["qkv", "q", "kv", "out", "fc1", "fc2"]})
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # wake the zero-initialised layers and the LoRA B matrices so every input matters
        for name, p in policy.net.named_parameters():
            if "ada" in name or "final_linear" in name or "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return policy


CASES = {
    # name: (policy, prompts, objective, plan, noise, minibatches, split, epochs, gated KL, SGD lr)
    "toy-tb-tree-cps-leafsplit": (toy_policy, ["toy"] * 2, lambda: SoftmaxTBObjective(kl_coef=0.3, clip_eps=0.02),
                                  DynamicTreePlan(dynamic=False, fixed_positions=[1, 3, 4]), "cps", 2, "leaves", 2, False, 0.05),
    "toy-grpo-indep-sde-groupleaves": (toy_policy, ["toy"] * 2, lambda: GRPOObjective(kl_coef=0.3, clip_eps=0.005),
                                       IndependentPlan(group_size=6), "sde", 3, "group_leaves", 1, True, 0.5),
    "toy-grpo-tree-sde-exactkl": (toy_policy, ["toy"] * 3, lambda: GRPOObjective(kl_coef=0.5, clip_eps=0.005, kl_form="exact"),
                                  DynamicTreePlan(branch=2, dynamic=False, fixed_positions=[2, 4, 5]), "sde", 2, "groups", 2, False, 0.5),
    "mini-tb-tree-sde-leafsplit": (mini_policy, ["a red circle", "two blue squares"],
                                   lambda: SoftmaxTBObjective(kl_coef=0.3, clip_eps=1e-5),
                                   DynamicTreePlan(branch=2, dynamic=False, fixed_positions=[1, 3, 4]), "sde", 2, "leaves", 1, False, 3e3),
    "mini-grpo-shared-cps-groupleaves": (mini_policy, ["a red circle", "two blue squares"],
                                         lambda: GRPOObjective(kl_coef=0.3, clip_eps=1e-5),
                                         IndependentPlan(group_size=4, sde_steps=[2, 3, 4, 5], same_initial_noise=True), "cps", 2, "group_leaves", 1, True, 3e3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_equals_naive_per_leaf_autograd_over_several_steps(case):
    make_policy, prompts, make_objective, plan, noise, n_mb, split, epochs, gated, lr = CASES[case]
    policy, objective = make_policy(), make_objective()
    rollout = FlowSampler(plan, 6, 0.7, noise).rollout(policy, prompts, [{}] * len(prompts), 3, 10, torch.Generator().manual_seed(1))
    n_leaves = rollout.leaves.shape[0]
    rewards = torch.rand(n_leaves, generator=torch.Generator().manual_seed(2))
    prepared = objective.prepare(rollout, rewards, step=3)
    if gated:  # a GARDO-style gate: the KL on some leaves only
        prepared.kl_leaf_weight = (torch.rand(n_leaves, generator=torch.Generator().manual_seed(3)) < 0.4).float()
        prepared.kl_leaf_weight[0] = 1.0
    kl_weight = prepared.kl_leaf_weight if gated else torch.ones(n_leaves)
    params = [p for _, p in policy.trainable_named_parameters()]
    start = [p.detach().clone() for p in params]

    opt = RecordingSGD(params, lr)
    stats = policy_update(policy, rollout, objective, prepared, opt, params, inner_epochs=epochs, minibatches=n_mb,
                          parent_chunk=3, minibatch_split=split, generator=torch.Generator().manual_seed(4))
    ours, ours_final = opt.grads, [p.detach().clone() for p in params]

    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    edges_of = leaf_edges(rollout)
    assert torch.equal(rollout.path, torch.stack([torch.zeros(rollout.path.shape[1]).index_fill(0, torch.tensor(e), 1.0)
                                                  for e in edges_of]))  # the sampler's path matrix agrees
    ref_opt = RecordingSGD(params, lr)
    for leaves in naive_splits(rollout, n_mb, split, torch.Generator().manual_seed(4), epochs):
        ref_opt.zero_grad(set_to_none=True)
        naive_loss(policy, rollout, objective, prepared.leaf_adv, kl_weight, leaves, edges_of, objective.clip_eps).backward()
        ref_opt.step()

    assert len(ours) == len(ref_opt.grads) == n_mb * epochs == stats["optimizer_steps"]
    def close(a, b):  # float32 rounding of batched vs one-at-a-time forwards, relative to the tensor's scale
        a, b = a.detach(), b.detach()
        return float((a - b).abs().max()) <= 1e-4 * float(b.abs().max()) + 1e-7

    for step, (a_step, b_step) in enumerate(zip(ours, ref_opt.grads)):
        assert any(float(b.abs().max()) > 0 for b in b_step)
        for a, b in zip(a_step, b_step):
            assert close(a, b), f"optimizer step {step}: max diff {float((a - b).abs().max())} of {float(b.abs().max())}"
    for a, b in zip(ours_final, params):
        assert close(a, b)
    assert stats["clip_frac"] > 0 and stats["log_ratio_absmax"] > objective.clip_eps  # later steps clip
    assert stats["kl_ref"] > 0


def test_first_step_uses_stored_log_probs_and_later_steps_recompute():
    policy, objective = toy_policy(), SoftmaxTBObjective(kl_coef=0.1)
    plan = DynamicTreePlan(dynamic=False, fixed_positions=[2, 3, 4])  # 1 + 3 + 9 = 13 model parents per tree
    rollout = FlowSampler(plan, 6, 0.7, "cps").rollout(policy, ["toy"] * 2, [{}] * 2, 0, 10, torch.Generator().manual_seed(1))
    prepared = objective.prepare(rollout, torch.rand(54, generator=torch.Generator().manual_seed(2)), step=0)
    params = [p for _, p in policy.trainable_named_parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    one = policy_update(policy, rollout, objective, prepared, opt, params, minibatches=1)
    assert one["fwd_nograd"] == 0 and one["fwd_grad"] == 26 and one["fwd_ref"] == 26
    assert "log_prob_drift" not in one  # nothing was recomputed without grad
    two = policy_update(policy, rollout, objective, prepared, opt, params, minibatches=2)
    # step 1 of 2 is fresh (no pass 1); step 2 recomputes its tree's 13 parents; reference once per rollout
    assert two["fwd_nograd"] == 13 and two["fwd_grad"] == 26 and two["fwd_ref"] == 26 and two["optimizer_steps"] == 2


def test_kl_weights_are_a_mean_over_leaves_of_path_means():
    policy = toy_policy()
    r = FlowSampler(IndependentPlan(group_size=4), 6, 0.7, "sde").rollout(policy, ["toy"], [{}], 0, 10, torch.Generator().manual_seed(0))
    mb = Minibatch.of_groups(r, torch.arange(1))
    parents = torch.unique(r.edge_parent)
    w, share = kl_parent_weights(r, mb, None, parents)
    model = ~r.parent_is_prior[parents]
    assert torch.allclose(w[model], torch.full_like(w[model], 1 / (4 * 5)))  # 4 leaves x 5 trained steps
    assert torch.all(w[~model] == 0) and w.sum().item() == pytest.approx(1.0) and float(share) == 1.0
    flagged = torch.tensor([1.0, 0.0, 0.0, 0.0])
    w1, share1 = kl_parent_weights(r, mb, flagged, parents)
    assert w1.sum().item() == pytest.approx(1.0) and int((w1 > 0).sum()) == 5 and float(share1) == 0.25
    w0, share0 = kl_parent_weights(r, mb, torch.zeros(4), parents)
    assert w0.sum().item() == 0.0 and float(share0) == 0.0
