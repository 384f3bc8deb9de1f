"""SDE / CPS transitions and Gaussian log-densities against values derived by hand."""

import math

import pytest
import torch

from tmpo.sde import flow_sde_step, gaussian_kl_equal_std, ratio_norm_log_ratio, sde_mean_std, transition_log_prob

X, V, SIG, SIG_NEXT, ETA = 1.0, 0.5, 0.5, 0.25, 0.7


def one(v: float) -> torch.Tensor:
    return torch.tensor([[v]], dtype=torch.float64)


def test_sde_step_matches_eqs_39_40_by_hand():
    # s = eta*sqrt(sigma/(1-sigma)) = 0.7; dt = -0.25
    # mean = x(1 + s^2 dt/(2 sigma)) + v(1 + s^2 (1-sigma)/(2 sigma)) dt = 0.8775 - 0.155625
    _, mean, std = flow_sde_step(one(X), one(V), SIG, SIG_NEXT, ETA, noise="sde", x_next=one(0.0))
    assert mean.item() == pytest.approx(0.721875, abs=1e-12)
    assert std.item() == pytest.approx(0.7 * 0.5, abs=1e-12)  # s * sqrt(-dt)


def test_cps_step_by_hand():
    std_hand = 0.25 * math.sin(0.7 * math.pi / 2)
    x0_hat, x1_hat = 1.0 - 0.5 * 0.5, 1.0 + 0.5 * 0.5
    mean_hand = 0.75 * x0_hat + math.sqrt(0.25**2 - std_hand**2) * x1_hat
    _, mean, std = flow_sde_step(one(X), one(V), SIG, SIG_NEXT, ETA, noise="cps", x_next=one(0.0))
    assert std.item() == pytest.approx(std_hand, abs=1e-12)
    assert mean.item() == pytest.approx(mean_hand, abs=1e-12)


@pytest.mark.parametrize("noise", ["sde", "cps"])
def test_eta_zero_is_the_euler_ode_step(noise):
    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    mean, std = sde_mean_std(x, v, 0.8, 0.6, 0.0, noise)
    assert torch.allclose(mean, x + v * (0.6 - 0.8))
    assert torch.all(std == 0)


def test_sde_at_sigma_one_uses_next_sigma_in_the_denominator():
    # sqrt(sigma/(1-sigma)) is infinite at sigma=1; Flow-GRPO uses 1 - sigma_next there: s = 0.7*sqrt(1/0.2)
    _, _, std = flow_sde_step(one(X), one(V), 1.0, 0.8, ETA, noise="sde", x_next=one(0.0))
    assert std.item() == pytest.approx(0.7 * math.sqrt(1 / 0.2) * math.sqrt(0.2), abs=1e-12)


def test_per_sample_sigmas_and_sampling_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 20000, dtype=torch.float64)
    v = torch.zeros_like(x)
    x_next, mean, std = flow_sde_step(x, v, torch.tensor([0.5, 0.9]), torch.tensor([0.25, 0.5]), 0.7, "cps", g)
    assert std.shape == (2,)
    assert std[1].item() == pytest.approx(0.5 * math.sin(0.35 * math.pi))
    emp = (x_next - mean).std(dim=1)
    assert torch.allclose(emp, std, rtol=0.03)


def test_x_next_is_passed_through_for_recomputation():
    given = torch.randn(3, 2)
    out, _, _ = flow_sde_step(torch.randn(3, 2), torch.randn(3, 2), 0.5, 0.3, 0.7, x_next=given)
    assert out is given


def test_transition_log_prob_is_the_per_dim_mean_gaussian_density():
    x_next = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    mean = torch.zeros_like(x_next)
    c = math.log(2.0) + 0.5 * math.log(2 * math.pi)
    hand = 0.5 * ((-(1.0**2) / 8 - c) + (-(2.0**2) / 8 - c))  # -(x-mu)^2/(2 std^2) - log std - log sqrt(2pi)
    assert transition_log_prob(x_next, mean, 2.0).item() == pytest.approx(hand, abs=1e-12)


def test_zero_std_has_no_density():
    with pytest.raises(ValueError, match="std must be > 0"):
        transition_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


def test_unknown_noise_type_is_a_clear_error():
    with pytest.raises(ValueError, match="valid options: sde, cps"):
        sde_mean_std(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.3, 0.7, "ddim")


def test_gaussian_kl_equal_std_by_hand():
    a = torch.tensor([[1.0, 0.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    # (1 + 0 + 4) / (2 * 0.5^2) / 3
    assert gaussian_kl_equal_std(a, b, 0.5).item() == pytest.approx(5 / 0.5 / 3)


def test_ratio_norm_adds_the_detached_mean_shift_term():
    mean_old = torch.zeros(1, 2, dtype=torch.float64)
    mean_new = torch.tensor([[0.3, -0.1]], dtype=torch.float64, requires_grad=True)
    x_next = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    std = torch.tensor([0.4], dtype=torch.float64)
    lp_new = transition_log_prob(x_next, mean_new, std)
    lp_old = transition_log_prob(x_next, mean_old, std)
    log_w = ratio_norm_log_ratio(lp_new, lp_old, mean_new, mean_old, std)
    bias = (0.3**2 + 0.1**2) / (2 * 0.16) / 2
    assert log_w.item() == pytest.approx((lp_new - lp_old).item() + bias)
    # eq. 32: the centred log-ratio equals dmu . eps / std (per dim), eps = (x_next - mu_old)/std
    eps = (x_next - mean_old) / 0.4
    assert log_w.item() == pytest.approx(((mean_new.detach() * eps).sum() / 0.4 / 2).item())
    (g,) = torch.autograd.grad(log_w.sum(), mean_new, retain_graph=True)
    (g_lp,) = torch.autograd.grad(lp_new.sum(), mean_new)
    assert torch.allclose(g, g_lp)  # the bias term carries no gradient


# --- KL to the reference in each form (tmpo.sde.reference_kl) --------------------------------------
def test_reference_kl_forms_on_a_hand_made_transition():
    from tmpo.sde import reference_kl

    mean, ref = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)  # ||mean - ref||^2 = 5 over d = 2 dims
    sig, nxt = torch.tensor([0.75]), torch.tensor([0.5])  # |dt| = 0.25
    # sde, eta 0.7: s_t = 0.7 sqrt(0.75 / 0.25) = 0.7 sqrt(3), std = s_t sqrt(0.25): std^2 = 0.49 * 3 * 0.25 = 0.3675
    _, std = sde_mean_std(torch.zeros(1, 2), torch.zeros(1, 2), sig, nxt, 0.7, "sde")
    assert float(std[0]) ** 2 == pytest.approx(0.3675)
    exact = reference_kl(mean, ref, std, sig, nxt, "sde", "exact")
    flow = reference_kl(mean, ref, std, sig, nxt, "sde", "flow_grpo")
    assert float(exact[0]) == pytest.approx(5 / (2 * 0.3675 * 2))  # 3.4014: the Gaussian KL per dim
    assert float(flow[0]) == pytest.approx(5 / (2 * 0.49 * 3 * 2))  # 0.8503: Flow-GRPO divides by 2 s_t^2
    assert float(flow[0]) / float(exact[0]) == pytest.approx(0.25)  # = |dt|
    # cps: Flow-GRPO's std output is the true noise std 0.5 sin(0.35 pi), so the forms coincide
    _, std_c = sde_mean_std(torch.zeros(1, 2), torch.zeros(1, 2), sig, nxt, 0.7, "cps")
    expected = 5 / (2 * (0.5 * math.sin(0.35 * math.pi)) ** 2 * 2)  # 6.298
    for form in ("exact", "flow_grpo"):
        assert float(reference_kl(mean, ref, std_c, sig, nxt, "cps", form)[0]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="valid options: exact, flow_grpo"):
        reference_kl(mean, ref, std, sig, nxt, "sde", "flowgrpo")
