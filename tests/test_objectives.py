"""Advantages, clipped surrogate and the two objectives' losses against hand-derived values."""

import math

import pytest
import torch

from tmpo.objectives import (
    GRPOObjective, Minibatch, Prepared, SoftmaxTBObjective, clipped_surrogate, group_zscore, linear_warmup,
    softmax_tb_advantage, uniform_policy_advantage,
)


def test_softmax_tb_advantage_by_hand():
    r = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    lp = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # p = (1/4, 3/4)
    z = math.exp(2.0) + 1.0
    hand = [2.0 - math.log(z) - math.log(0.25), -math.log(z) - math.log(0.75)]
    assert softmax_tb_advantage(r, lp, beta=2.0)[0].tolist() == pytest.approx(hand)


def test_boltzmann_weighted_advantage_is_the_forward_kl():
    # eq. 16: sum_i q_i A_i = KL(q || p) >= 0, equality iff p = q
    g = torch.Generator().manual_seed(0)
    r, lp = torch.randn(5, 27, generator=g, dtype=torch.float64), torch.randn(5, 27, generator=g, dtype=torch.float64)
    a = softmax_tb_advantage(r, lp, beta=1.5)
    q, p = torch.softmax(1.5 * r, -1), torch.softmax(lp, -1)
    kl = (q * (q.log() - p.log())).sum(-1)
    assert torch.allclose((q * a).sum(-1), kl) and torch.all(kl > 0)
    assert torch.allclose(softmax_tb_advantage(r, 1.5 * r + 7.0, beta=1.5), torch.zeros_like(r), atol=1e-12)


def test_uniform_policy_term():
    r = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    z = math.exp(1.0) + 2.0
    assert uniform_policy_advantage(r, 1.0)[0].tolist() == pytest.approx(
        [1.0 - math.log(z) + math.log(3), -math.log(z) + math.log(3), -math.log(z) + math.log(3)]
    )


def test_group_zscore_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    a = group_zscore(r, eps=0.0)
    s = math.sqrt(2 / 3)
    assert a[0].tolist() == pytest.approx([-1 / s, 0.0, 1 / s])
    s2 = math.sqrt(((4 / 3) ** 2 * 2 + (8 / 3) ** 2) / 3)
    assert a[1].tolist() == pytest.approx([-4 / 3 / s2, -4 / 3 / s2, 8 / 3 / s2])
    # global std: one std over all six rewards (biased), mean still per group
    g = group_zscore(r, eps=0.0, global_std=True)
    assert g[0, 2].item() == pytest.approx(1.0 / r.std(unbiased=False).item())


def test_linear_warmup():
    assert linear_warmup(0, 0.8, 2.0, 150) == pytest.approx(0.8)
    assert linear_warmup(75, 0.8, 2.0, 150) == pytest.approx(1.4)
    assert linear_warmup(500, 0.8, 2.0, 150) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "ratio, adv, value, grad",
    [
        (1.1, 1.0, 1.1, 1.0),  # inside the trust region: w A
        (1.5, 1.0, 1.2, 0.0),  # beneficial over-update: clipped, no gradient
        (0.5, 1.0, 0.5, 1.0),  # harmful deviation (A > 0, w < 1 - eps): corrective gradient
        (0.5, -1.0, -0.8, 0.0),  # beneficial over-update with A < 0
        (1.5, -1.0, -1.5, -1.0),  # harmful deviation with A < 0
    ],
)
def test_clipped_surrogate_cases(ratio, adv, value, grad):
    w = torch.tensor(ratio, requires_grad=True)
    out = clipped_surrogate(w, torch.tensor(adv), 0.2)
    out.backward()
    assert out.item() == pytest.approx(value) and w.grad.item() == pytest.approx(grad)


def two_leaf_minibatch(lp_old):
    # leaf 0 uses edges 0, 1; leaf 1 uses edges 0, 2 (a shared first edge, as in a tree)
    path = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    return Minibatch(
        leaf_ids=torch.arange(2), edge_ids=torch.arange(3), path=path,
        edge_is_prior=torch.zeros(3, dtype=torch.bool), log_prob_old=lp_old, latent_dim=4,
    )


def test_softmax_tb_loss_value_and_gradient_signs():
    lp_old = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    mb = two_leaf_minibatch(lp_old)
    obj = SoftmaxTBObjective(clip_eps=0.2, ratio_norm=True)
    prep = Prepared(leaf_adv=torch.tensor([1.0, -0.5], dtype=torch.float64))
    lp = (lp_old + torch.tensor([0.05, 0.0, 0.0], dtype=torch.float64)).requires_grad_(True)
    bias = torch.tensor([0.01, 0.0, 0.02], dtype=torch.float64)
    loss, _ = obj.loss(mb, lp, bias, prep)
    w0, w1 = math.exp(0.05 + 0.01), math.exp(0.05 + 0.01 + 0.02)  # trajectory ratios (RatioNorm on)
    assert loss.item() == pytest.approx(-(w0 * 1.0 + w1 * -0.5) / 2)
    loss.backward()
    # dL/dlp_e = -(1/K) sum_{i through e} w_i A_i
    assert lp.grad.tolist() == pytest.approx([-(w0 - 0.5 * w1) / 2, -w0 / 2, 0.5 * w1 / 2])
    assert lp.grad[1] < 0 < lp.grad[2]  # descent raises the positive-advantage leaf's own edge


def test_softmax_tb_sum_reduction_scales_log_ratios_by_d():
    lp_old = torch.zeros(3, dtype=torch.float64)
    mb = two_leaf_minibatch(lp_old)
    obj = SoftmaxTBObjective(ratio_norm=False, log_prob_reduction="sum", clip_eps=10.0)
    lp = torch.tensor([0.01, 0.02, 0.0], dtype=torch.float64)
    loss, _ = obj.loss(mb, lp, torch.zeros(3, dtype=torch.float64), Prepared(leaf_adv=torch.tensor([1.0, 0.0], dtype=torch.float64)))
    assert loss.item() == pytest.approx(-math.exp(4 * 0.03) / 2)


def test_grpo_loss_uses_per_step_ratios_and_skips_prior_edges():
    lp_old = torch.zeros(3, dtype=torch.float64)
    mb = two_leaf_minibatch(lp_old)
    mb.edge_is_prior = torch.tensor([True, False, False])  # the shared first edge is an x_T draw
    obj = GRPOObjective(clip_eps=0.2)
    lp = torch.tensor([0.0, math.log(1.1), math.log(1.5)], dtype=torch.float64, requires_grad=True)
    prep = Prepared(leaf_adv=torch.tensor([1.0, 1.0], dtype=torch.float64))
    loss, stats = obj.loss(mb, lp, torch.zeros(3, dtype=torch.float64), prep)
    assert loss.item() == pytest.approx(-(1.1 + 1.2) / 2)  # pairs (0, e1) and (1, e2); e2 is clipped
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([0.0, -1.1 / 2, 0.0])


def test_grpo_prepare_clamps_advantages():
    obj = GRPOObjective(adv_clip=1.0)
    a = obj.leaf_advantages(torch.tensor([[0.0, 0.0, 0.0, 10.0]]))
    assert a.max().item() == pytest.approx(1.0)
