"""Each baseline's own math against hand-derived values, and every method/ablation end to end on the toy."""

import json
import math

import numpy as np
import pytest
import torch

from baselines.gardo import (
    GARDOObjective, RiskCompensator, descending_ranks, diversity_advantage, gate_flags, nearest_neighbour_distance, uncertainty,
)
from baselines.mixgrpo import SlidingWindowPlan, sliding_window
from baselines.treegrpo import TreeWindowPlan, propagate_tree_advantages, sibling_log_weights
from conftest import compose_run
from tmpo.metrics.features import FlattenFeatures
from tmpo.objectives.advantages import sibling_log_softmax
from tmpo.objectives.stepwise_balance import subtree_log_flow
from tmpo.run import train
from tmpo.sde import gaussian_kl_equal_std


# --- MixGRPO -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "iteration, expected", [(0, [1, 2, 3, 4]), (24, [1, 2, 3, 4]), (25, [2, 3, 4, 5]), (50, [3, 4, 5, 6]), (25 * 20, [21, 22, 23])]
)
def test_mixgrpo_window_on_25_steps(iteration, expected):
    # 25 steps, w = 4, tau = 25, s = 1: W = [l, min(l + 4, 23)) 0-based with l = iteration // 25
    assert sliding_window(iteration, 25, 4, 25, 1) == expected


def test_mixgrpo_window_caps_and_rolls_back():
    assert sliding_window(25 * 22, 25, 4, 25, 1) == [23]  # l = 22: [22, 23) -> the last window step
    assert sliding_window(25 * 23, 25, 4, 25, 1) == [1, 2, 3, 4]  # l = 23 would be empty: back to 0
    assert sliding_window(1000, 25, 4, 25, 0) == [1, 2, 3, 4]  # s = 0 freezes it (Flash*)


def test_mixgrpo_plan_splits_the_group_at_the_window():
    literal = SlidingWindowPlan(group_size=27, window=4, shift_every=25, shift=1, scaling="literal")
    plan = literal.make(25, 100, 6, np.random.default_rng(0))
    assert plan.n_roots == 1 and plan.group_size == 27
    assert [s.stochastic for s in plan.steps] == [False, True, True, True, False, False]
    assert [s.branch for s in plan.steps] == [1, 27, 1, 1, 1, 1]


def test_mixgrpo_window_scaled_to_the_horizon():
    from baselines.mixgrpo import scaled_window

    assert scaled_window(25, 300, 4, 25, 1, 25, 300) == (4, 25, 1)  # its own setting is left unchanged
    # 6 steps, 300 iterations: w = round(4 * 6 / 25) = 1; tau = 300 * 25 * 25 / (6 * 1 * 300) = 104.2 -> 104
    assert scaled_window(6, 300, 4, 25, 1, 25, 300) == (1, 104, 1)
    assert scaled_window(6, 150, 4, 25, 1, 25, 300) == (1, 52, 1)
    assert scaled_window(6, 300, 4, 25, 0, 25, 300) == (1, 25, 0)  # Flash*: frozen
    plan = SlidingWindowPlan()  # scaling="horizon" by default
    assert [plan.make(it, 300, 6, None).stored_steps for it in (0, 103, 104, 207, 208, 299)] == [[1], [1], [2], [2], [3], [3]]
    assert plan.make(0, 300, 6, None).steps[0].branch == 27
    with pytest.raises(ValueError, match="scaling"):
        SlidingWindowPlan(scaling="fractions")


# --- TreeGRPO ------------------------------------------------------------------------------------
def test_treegrpo_window_plan():
    plan = TreeWindowPlan(branch=3, window=3, shift_every=2, shift=1)
    starts = [next(i for i, s in enumerate(plan.make(it, 10, 6, None).steps) if s.stochastic) + 1 for it in range(8)]
    assert starts == [1, 1, 2, 2, 3, 3, 1, 1]  # windows end at step 5 at the latest: never the last step
    assert plan.make(0, 10, 6, None).group_size == 27


def test_treegrpo_advantage_on_a_two_level_tree():
    # root -> a, b (edges 0, 1 at step 1); a -> a1, a2 (edges 2, 3); b -> b1, b2 (edges 4, 5)
    edge_parent = torch.tensor([0, 0, 1, 1, 2, 2])
    edge_step = torch.tensor([1, 1, 2, 2, 2, 2])
    lp_old = torch.tensor([0.0, 0.0, math.log(3.0), 0.0, 0.0, 0.0])
    path = torch.tensor([[1, 0, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 1]], dtype=torch.float64)
    leaf_adv = torch.tensor([1.0, -1.0, 2.0, 0.0], dtype=torch.float64)
    log_w = sibling_log_weights(edge_parent, lp_old, "logp")
    assert torch.allclose(log_w.exp(), torch.tensor([0.5, 0.5, 0.75, 0.25, 0.5, 0.5], dtype=torch.float64))
    a = propagate_tree_advantages(path, edge_step, log_w, leaf_adv)
    # leaf edges carry their leaf's advantage; a = 0.75*1 + 0.25*(-1) = 0.5; b = 0.5*2 + 0.5*0 = 1
    assert a.tolist() == pytest.approx([0.5, 1.0, 1.0, -1.0, 2.0, 0.0])
    uniform = propagate_tree_advantages(path, edge_step, sibling_log_weights(edge_parent, lp_old, "uniform"), leaf_adv)
    assert uniform.tolist()[:2] == pytest.approx([0.0, 1.0])


# --- GARDO ---------------------------------------------------------------------------------------
def test_gardo_weights_for_a_three_sample_group():
    # unit features: f0 = (1, 0), f1 = (0, 1), f2 = (1, 1)/sqrt2
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    d = nearest_neighbour_distance(f)
    c = 1 - 1 / math.sqrt(2)
    assert d[0].tolist() == pytest.approx([c, c, c])
    f = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [1.0, 0.1]]], dtype=torch.float64)
    d = nearest_neighbour_distance(f)
    c2 = 1 - 1 / math.sqrt(1.01)
    assert d[0].tolist() == pytest.approx([c2, 1 + 1 / math.sqrt(1.01), c2])
    r = torch.tensor([[1.0, 0.8, 0.0]], dtype=torch.float64)  # mean 0.6: samples 0 and 1 are above it
    a = diversity_advantage(r, d)
    mean_d = d[0].mean().item()
    assert a[0].tolist() == pytest.approx([0.4 * c2 / mean_d, 0.2 * d[0, 1].item() / mean_d, -0.6])


def test_gardo_uncertainty_ranks_and_gate():
    main = torch.tensor([0.9, 0.1, 0.5, 0.3])
    aux = [torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([0.2, 0.8, 0.6, 0.1])]
    assert descending_ranks(main).tolist() == [1, 4, 2, 3]
    # aux ranks [4, 1, 2, 3] and [3, 1, 2, 4]: mean [3.5, 1, 2, 3.5]; u = rank_main - mean
    u = uncertainty(main, aux)
    assert u.tolist() == pytest.approx([-2.5, 3.0, 0.0, -0.5])
    assert gate_flags(u, 0.2).tolist() == [False, True, False, False]  # > 80th pct of {3, 0}
    assert uncertainty(main, aux, sign=-1.0).tolist() == pytest.approx([2.5, -3.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="auxiliary rewards"):
        uncertainty(main, [])


def test_gardo_risk_compensator():
    rc = RiskCompensator(b=0.1, history=3)
    assert rc.update(torch.tensor([1.0, -1.0])) == pytest.approx(0.1)  # no history yet
    assert rc.update(torch.tensor([2.0])) == pytest.approx(0.11)  # above the max of [1]
    assert rc.update(torch.tensor([0.5])) == pytest.approx(0.099)  # below the min of [1, 2]
    for _ in range(40):
        rc.update(torch.tensor([float(len(rc.means) + 100 + _)]))
    assert rc.b == pytest.approx(0.2)  # clipped at b_max


def test_flow_grpo_kl_between_two_gaussians():
    # KL(N(m1, s^2) || N(m2, s^2)) = (m1 - m2)^2 / (2 s^2), averaged over dims as Flow-GRPO does
    m1 = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    m2 = torch.tensor([[0.0, 0.5]], dtype=torch.float64)
    assert gaussian_kl_equal_std(m1, m2, 0.5).item() == pytest.approx(((0.25 + 1.0) / (2 * 0.25)) / 2)


# --- step-wise balance ---------------------------------------------------------------------------
def test_stepwise_balance_flow_and_sibling_softmax():
    path = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.float64)
    r = torch.tensor([1.0, 0.0, 0.5])
    log_f = subtree_log_flow(path, r, beta=2.0)
    assert log_f.tolist() == pytest.approx([math.log((math.e**2 + 1) / 2), 1.0, 2.0, 0.0])
    parent = torch.tensor([0, 0, 1, 1])
    ls = sibling_log_softmax(torch.tensor([0.0, math.log(3.0), 1.0, 1.0]), parent)
    assert ls.exp().tolist() == pytest.approx([0.25, 0.75, 0.5, 0.5])


# --- every method and ablation on the toy ----------------------------------------------------------
RUNS = [["method=tmpo"], ["method=grpo"], ["method=flow_grpo"], ["method=mixgrpo"], ["method=treegrpo"], ["method=gardo"]] + [
    ["method=tmpo", f"ablation={a}"] for a in ("beta1", "detailed_balance", "no_tree", "fixed_branching")
]


@pytest.mark.parametrize("overrides", RUNS, ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_every_method_and_ablation_runs_on_the_toy(tmp_path, overrides):
    cfg = compose_run(overrides + ["trainer.total_steps=3", "trainer.prompts_per_step=2", "eval.samples_per_prompt=200",
                                   "trainer.ema_every=1", "trainer.inner_epochs=2"], tmp_path)
    summary = train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 3
    common = {"train/loss", "train/reward_mean", "train/ratio_mean", "train/clip_frac", "train/log_ratio_absmax",
              "train/kl_ref", "train/grad_norm", "train/optimizer_steps", "nfe/grad_per_prompt",
              "train/group_size", "train/nfe", "diag/p_entropy_frac", "diag/logp_spread", "iter_time_s"}
    assert common <= set(train_rows[-1])
    assert train_rows[-1]["train/group_size"] == 27
    for key in ("reward", "modes_covered", "kl_to_target", "base/reward", "iter_time_s"):
        assert math.isfinite(summary[key])
    assert train_rows[-1]["train/log_prob_drift"] > 0  # the second inner epoch sees a moved policy
    assert train_rows[-1]["train/log_ratio_absmax"] > 0  # later optimizer steps see moved ratios
    lrs = [r["train/lr"] for r in train_rows]
    if overrides[0] in ("method=flow_grpo", "method=gardo", "method=mixgrpo", "method=treegrpo"):
        assert lrs == [lrs[0]] * 3  # their code's constant learning rate
    else:
        assert lrs[0] > lrs[1] > lrs[2]  # TMPO's cosine (App. D.4)
    if overrides == ["method=gardo"]:
        assert [r["train/reference_resets"] for r in train_rows][0] >= 0 and "train/kl_ref_all_max" in train_rows[-1]


def test_gardo_objective_prepare_with_uncertainty_gate(toy_policy):
    from tmpo.samplers import FlowSampler, IndependentPlan

    r = FlowSampler(IndependentPlan(group_size=4, same_initial_noise=True), 6, 0.9, "sde").rollout(
        toy_policy, ["toy"] * 2, [{}] * 2, 0, 10, torch.Generator().manual_seed(0))
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.4, 0.2, 0.3, 0.8, 0.7])
    aux = {"aes": rewards.flip(0), "ir": rewards.flip(0) * 2}
    obj = GARDOObjective(features=FlattenFeatures(), kl_gate="uncertainty", zscore=False)
    prep = obj.prepare(r, rewards, 0, samples=r.leaves, reward_info={"aux": aux})
    assert prep.kl_leaf_weight is not None and 0 < prep.kl_leaf_weight.sum() < 8
    r, a = rewards.view(2, 4), prep.leaf_adv.view(2, 4)
    below = r < r.mean(1, keepdim=True)
    assert torch.allclose(a[below], (r - r.mean(1, keepdim=True))[below])  # w = 1 below the group mean, no std


def test_gardo_zscored_diversity_advantage_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0]])  # mean 3, biased std sqrt(14 / 4) = 1.8708
    nn = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # mean 0.25: weights 1.2 and 1.6 for the two samples >= the mean
    std = math.sqrt(3.5) + 1e-4
    expected = [-2 / std, -1 / std, 0.0, 3 / std * 1.6]
    assert diversity_advantage(rewards, nn, zscore=True, std_eps=1e-4)[0].tolist() == pytest.approx(expected)
    assert diversity_advantage(rewards, nn)[0].tolist() == pytest.approx([-2.0, -1.0, 0.0, 3 * 1.6])  # GARDO's code


@pytest.mark.parametrize(
    "method, shared_x_T, trained, zscore", [("gardo", False, [1, 2, 3, 4], True), ("gardo_code", True, [1, 2, 3, 4], False)]
)
def test_gardo_methods_compose_to_the_compared_and_the_code_settings(tmp_path, method, shared_x_T, trained, zscore):
    from hydra.utils import instantiate

    cfg = compose_run([f"method={method}"], tmp_path)
    plan = instantiate(cfg.sampler.plan)
    assert plan.same_initial_noise is shared_x_T
    assert plan.make(0, 10, 6, np.random.default_rng(0)).stored_steps == trained  # int(6 * 0.7) = 4 of 6
    assert cfg.objective.zscore is zscore and cfg.objective.kl_coef == 0.04 and cfg.objective.kl_form == "flow_grpo"


@pytest.mark.parametrize(
    "method, steps, split, schedule, ema_decay, kl_form",
    [("tmpo", 2, "groups", "cosine", 0.9, "exact"), ("grpo", 2, "groups", "cosine", 0.9, "flow_grpo"),
     ("flow_grpo", 2, "leaves", "constant", 0.9, "flow_grpo"), ("gardo", 2, "leaves", "constant", 0.9, "flow_grpo"),
     ("mixgrpo", 4, "group_leaves", "constant", 0.0, "flow_grpo"), ("treegrpo", 2, "groups", "constant", 0.9, "flow_grpo")],
)
def test_each_method_defaults_to_its_codes_update_schedule(tmp_path, method, steps, split, schedule, ema_decay, kl_form):
    cfg = compose_run([f"method={method}", "model=mini", "reward=geneval"], tmp_path)  # scale configs must not undo it
    t = cfg.trainer
    assert (t.minibatches, t.minibatch_split, t.lr_schedule, t.ema_decay, cfg.objective.kl_form) == (steps, split, schedule, ema_decay, kl_form)


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "target_modules": ["fc1", "fc2", "fc3"]}])
def test_gardo_reference_reset_makes_the_reference_the_current_policy(lora):
    from tmpo.policies.toy import ToyPolicy

    policy = ToyPolicy(lora=lora)
    x, sig = torch.randn(5, 2), torch.full((5,), 0.5)
    with torch.no_grad():
        for _, p in policy.trainable_named_parameters():
            p.add_(0.1 * torch.randn_like(p))
        moved = policy.velocity(x, sig, None, None)
        with policy.reference():
            before = policy.velocity(x, sig, None, None)
    assert not torch.allclose(moved, before)
    obj = GARDOObjective(features=FlattenFeatures(), kl_gate="all", kl_thres=1e-3, reset_every=15)
    # the threshold reads the all-sample KL of the worst optimizer step, not the gated-sample penalty
    assert obj.after_update(policy, {"kl_ref_max": 2e-3, "kl_ref_all_max": 1e-4}, 0) == {
        "gardo_reference_reset": 0.0, "reference_resets": 0.0}
    assert obj.after_update(policy, {"kl_ref_all_max": 2e-3}, 1) == {"gardo_reference_reset": 1.0, "reference_resets": 1.0}
    with torch.no_grad(), policy.reference():
        after = policy.velocity(x, sig, None, None)
    assert torch.allclose(after, moved, atol=1e-6)
    trainable = {n for n, _ in policy.trainable_named_parameters()}
    assert trainable and not any(".reference." in n for n in trainable)
    for i in range(16):  # no KL excess: reset after 15 iterations anyway
        out = obj.after_update(policy, {"kl_ref_all_max": 0.0}, 2 + i)
    assert out == {"gardo_reference_reset": 1.0, "reference_resets": 2.0}
