"""Science diagnostics on hand-made groups, and the objective options they motivate."""

import math

import pytest
import torch

from tmpo.diagnostics import group_diagnostics
from tmpo.objectives import SoftmaxTBObjective, group_zscore, softmax_tb_advantage


def test_uniform_p_has_full_entropy_and_no_spread():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.2]])
    d = group_diagnostics(r, torch.zeros(1, 4), softmax_tb_advantage(r, torch.zeros(1, 4), 2.0))
    assert d["p_entropy_frac"] == pytest.approx(1.0)
    assert d["logp_spread"] == pytest.approx(0.0)
    assert math.isnan(d["corr_logp_reward"])  # constant log p: no correlation defined
    assert d["adv_var_from_log_q"] == pytest.approx(1.0)  # A = log q + log K: all of it from log q


def test_peaked_p_entropy_by_hand():
    # p = (1/2, 1/4, 1/4): H = 1.5 log 2; fraction of log 3
    log_p = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    r = torch.tensor([[1.0, 0.0, 0.0]])
    d = group_diagnostics(r, log_p, softmax_tb_advantage(r, log_p, 1.0))
    assert d["p_entropy_frac"] == pytest.approx(1.5 * math.log(2) / math.log(3))
    assert d["logp_spread"] == pytest.approx(torch.log(torch.tensor([0.5, 0.25, 0.25])).std(unbiased=False).item())
    assert d["corr_logp_reward"] == pytest.approx(1.0)  # log p ranks exactly like R here


def test_zscore_advantage_is_fully_explained_by_log_q():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(4, 9, generator=g)
    d = group_diagnostics(r, torch.randn(4, 9, generator=g), group_zscore(r))
    assert d["adv_var_from_log_q"] == pytest.approx(1.0)


def test_policy_term_noise_lowers_the_share_explained_by_log_q():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(8, 27, generator=g)
    lp = 3.0 * torch.randn(8, 27, generator=g)
    d = group_diagnostics(r, lp, softmax_tb_advantage(r, lp, 2.0))
    assert d["adv_var_from_log_q"] < 0.3


def test_uniform_policy_term_objective_ignores_log_probs(toy_policy):
    from tmpo.samplers import DynamicTreePlan, FlowSampler

    r = FlowSampler(DynamicTreePlan(), 6, 0.7, "cps").rollout(toy_policy, ["toy"], [{}], 0, 10, torch.Generator().manual_seed(0))
    rewards = torch.rand(27, generator=torch.Generator().manual_seed(3))
    uni = SoftmaxTBObjective(policy_term="uniform").prepare(r, rewards, 1000)
    traj = SoftmaxTBObjective(policy_term="trajectory").prepare(r, rewards, 1000)
    log_q = torch.log_softmax(2.0 * rewards, 0)
    assert torch.allclose(uni.leaf_adv, log_q + math.log(27), atol=1e-6)
    log_p = torch.log_softmax(r.trajectory_log_prob_old(), 0)
    assert torch.allclose(traj.leaf_adv, log_q - log_p, atol=1e-5)
    summed = SoftmaxTBObjective(log_prob_reduction="sum").prepare(r, rewards, 1000)
    assert torch.allclose(summed.leaf_adv, log_q - torch.log_softmax(2 * r.trajectory_log_prob_old(), 0), atol=1e-5)  # d = 2


def test_bad_policy_term_is_rejected():
    with pytest.raises(ValueError, match="policy_term"):
        SoftmaxTBObjective(policy_term="both")
