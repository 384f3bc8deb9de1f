"""The leaf log-density by the probability-flow ODE (tmpo/likelihood.py) and the marginal policy term.

References are closed forms derived by hand, not the code under test: a Gaussian's density and its
flow's inverse map, a Gaussian mixture's density, the trace of a linear field.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import compose_run
from tmpo.likelihood import LeafLikelihood, log_density, make_probes
from tmpo.objectives import SoftmaxTBObjective
from tmpo.policies.base import FlowPolicy
from tmpo.run import train
from tmpo.samplers import FlowSampler
from tmpo.samplers.plans import Plan, RolloutPlan, tree_plan

LOG_2PI = math.log(2 * math.pi)


def gaussian_flow(m: torch.Tensor, s: float):
    """The rectified-flow velocity ``E[x1 - x0 | x_sigma = x]`` of data ``N(m, s^2 I)``, by hand:
    ``x_sigma ~ N(a m, (a^2 s^2 + b^2) I)`` with ``a = 1 - sigma, b = sigma``, ``Cov(x1 - x0, x_sigma) = b - a s^2``."""

    def velocity(x, sigma, rows):
        a, b = (1 - sigma)[:, None], sigma[:, None]
        return -m + (b - a * s * s) / (a * a * s * s + b * b) * (x - a * m)

    return velocity


def mixture_flow(means: torch.Tensor, s: float, weights: torch.Tensor):
    """Exact velocity of a mixture of ``N(m_k, s^2 I)``: the posterior-weighted component velocities."""

    def velocity(x, sigma, rows):
        a, b = (1 - sigma)[:, None, None], sigma[:, None, None]
        var = a * a * s * s + b * b  # [N, 1, 1]
        diff = x[:, None, :] - a * means[None]  # [N, K, d]
        logw = weights.log()[None] - 0.5 * (diff.pow(2).sum(-1) / var[..., 0]) - 0.5 * x.shape[1] * var[..., 0].log()
        post = torch.softmax(logw, dim=1)[..., None]
        v_k = -means[None] + (b - a * s * s) / var * diff
        return (post * v_k).sum(1)

    return velocity


def mixture_log_density(x, means, s, weights):
    d = x.shape[1]
    sq = (x[:, None, :] - means[None]).pow(2).sum(-1)
    return torch.logsumexp(weights.log()[None] - 0.5 * sq / s**2 - d * math.log(s) - 0.5 * d * LOG_2PI, dim=1)


def test_gaussian_log_density_and_inverse_map_match_the_closed_form():
    m, s = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), 0.5
    x0 = m + s * torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = log_density(gaussian_flow(m, s), x0, LeafLikelihood(ode_steps=32, exact=True, solver="rk4"), dtype=torch.float64)
    expected = -0.5 * ((x0 - m) / s).pow(2).sum(1) - 3 * math.log(s) - 1.5 * LOG_2PI  # log N(x0; m, s^2 I)
    assert torch.allclose(out.log_density, expected, atol=1e-5)
    assert torch.allclose(out.x1, (x0 - m) / s, atol=1e-6)  # the flow maps data to its standardised noise
    assert torch.allclose(out.divergence, torch.full((6,), -3 * math.log(s), dtype=torch.float64), atol=1e-5)  # sign: +d log 2


@pytest.mark.parametrize("solver,steps,tol", [("euler", 256, 5e-2), ("heun", 64, 5e-3), ("rk4", 32, 1e-4)])
def test_every_solver_converges_to_the_mixture_density(solver, steps, tol):
    means = torch.tensor([[1.5, 0.0], [-1.5, 1.0]], dtype=torch.float64)
    weights = torch.tensor([0.7, 0.3], dtype=torch.float64)
    s = 0.6
    gen = torch.Generator().manual_seed(1)
    comp = torch.multinomial(weights, 10, replacement=True, generator=gen)
    x0 = means[comp] + s * torch.randn(10, 2, generator=gen, dtype=torch.float64)
    out = log_density(mixture_flow(means, s, weights), x0, LeafLikelihood(ode_steps=steps, exact=True, solver=solver),
                      dtype=torch.float64)
    assert (out.log_density - mixture_log_density(x0, means, s, weights)).abs().max() < tol


def test_hutchinson_is_exact_on_a_diagonal_field_and_estimates_the_trace_of_a_full_one():
    # v = A x: div v = tr A. Rademacher eps^T A eps = tr A exactly when A is diagonal (eps_i^2 = 1)
    diag = torch.diag(torch.tensor([0.5, -2.0, 1.0, 3.0], dtype=torch.float64))
    field = lambda a: (lambda x, sigma, rows: x @ a.T)  # noqa: E731
    x0 = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cfg = LeafLikelihood(ode_steps=2, probes=1, exact=False, solver="euler")
    out = log_density(field(diag), x0, cfg, torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(out.divergence, torch.full((5,), 2.5, dtype=torch.float64))
    full = diag + torch.tensor([[0, 1.0, -2, 0], [0.5, 0, 0, 1], [0, 0, 0, -1], [3, 0, 1, 0]], dtype=torch.float64)
    one = log_density(field(full), x0, cfg, torch.Generator().manual_seed(3), dtype=torch.float64)
    assert (one.divergence - 2.5).abs().max() > 0.1  # a single probe is noisy off the diagonal ...
    many = log_density(field(full), x0, LeafLikelihood(ode_steps=2, probes=4000, exact=False, solver="euler"),
                       torch.Generator().manual_seed(3), dtype=torch.float64)
    assert (many.divergence - 2.5).abs().max() < 0.15  # ... and averages to tr A (probe std ~ 4.3 / sqrt(4000))


def test_hutchinson_is_unbiased_against_the_exact_trace_on_a_nonlinear_field():
    """1,500 single-probe solves of one sample (rows get independent probes) against the exact trace with
    the same solver and grid: the mean lies within 4 standard errors (unbiased for the discretised integral)."""
    d = 6
    gen = torch.Generator().manual_seed(4)
    means = torch.randn(3, d, generator=gen, dtype=torch.float64)
    velocity = mixture_flow(means, 0.7, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    x0 = (means[0] + 0.7 * torch.randn(d, generator=gen, dtype=torch.float64)).expand(1500, d).clone()
    exact = log_density(velocity, x0[:1], LeafLikelihood(ode_steps=8, exact=True), dtype=torch.float64)
    est = log_density(velocity, x0, LeafLikelihood(ode_steps=8, probes=1, exact=False), gen, dtype=torch.float64)
    assert torch.allclose(est.x1, exact.x1.expand_as(est.x1))  # the path does not depend on the probes
    err = est.log_density.mean() - exact.log_density[0]
    se = est.log_density.std() / math.sqrt(x0.shape[0])
    assert float(est.log_density.std()) > 0.05 and abs(float(err)) < 4 * float(se)


def test_probes_have_identity_second_moment():
    basis = make_probes(3, (2, 2), probes=0, exact=True, generator=None)
    assert basis.shape == (4, 3, 2, 2)
    flat = basis[:, 0].reshape(4, 4)
    assert torch.allclose(flat.T @ flat / 4, torch.eye(4, dtype=torch.float64))
    rad = make_probes(2, (5,), probes=3, exact=False, generator=torch.Generator().manual_seed(0))
    assert set(rad.unique().tolist()) == {-1.0, 1.0}


def test_settings_are_checked_with_one_message():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['step'\]; valid keys: ode_steps, probes, exact"):
        LeafLikelihood.from_config({"step": 3})
    with pytest.raises(ValueError, match="ode_steps=0 .*solver='rk3'"):
        LeafLikelihood(ode_steps=0, solver="rk3")
    assert LeafLikelihood(exact="auto").exact_for(2) and not LeafLikelihood(exact="auto").exact_for(3072)
    assert LeafLikelihood(ode_steps=8, solver="heun", probes=2).evaluations_per_sample(3072) == 32
    assert LeafLikelihood(ode_steps=8, solver="rk4", exact="auto").evaluations_per_sample(2) == 64


# --- the sampler and the objective -----------------------------------------------------------------


class AffineFieldPolicy(FlowPolicy):
    """``v(x) = W x + c_g`` in 2-D with a prompt-dependent translation ``c_g = (g, -g)``; ``W`` antisymmetric
    (a rotation), so the flow preserves volume: ``div v = 0`` and ``log p_0(x_0) = log N(x_1; 0, I)``."""

    latent_shape = (2,)

    def __init__(self, omega: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Linear(2, 2)
        with torch.no_grad():
            self.net.weight.copy_(torch.tensor([[0.0, omega], [-omega, 0.0]]))
            self.net.bias.zero_()
        self.setup_finetuning(None)

    def sigmas(self, num_steps):
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def encode_prompts(self, prompts):
        return torch.tensor([[float(p), -float(p)] for p in prompts])

    def _velocity(self, net, x, sigma, cond, index):
        return net(x) + cond[index]

    def decode(self, latents):
        return latents


class PriorOnlyPlan(Plan):
    """K independent initial noises, every step deterministic: the leaf is a function of its noise only."""

    def __init__(self, k: int) -> None:
        self.k = k

    def make(self, step, total_steps, num_steps, rng) -> RolloutPlan:
        return tree_plan([1], self.k, num_steps)


def test_marginal_reduces_to_the_trajectory_form_for_a_volume_preserving_deterministic_sampler():
    """Where the two policy terms must agree: leaves that are a deterministic (ODE) image of independent
    noises, under a flow whose Euler map equals its exact flow and preserves volume (a translation).
    Then p(x_0) = N(x_1) and log P_old(tau) (sum over dims) is the same number; so are the advantages."""
    policy = AffineFieldPolicy(omega=0.0)
    sampler = FlowSampler(PriorOnlyPlan(5), num_steps=4, leaf_likelihood={"ode_steps": 4, "solver": "euler", "exact": True})
    r = sampler.rollout(policy, ["1", "-2", "0.5"], [{}] * 3, 0, 10, torch.Generator().manual_seed(0))
    traj = r.trajectory_log_prob_old().double() * r.latent_dim  # per-dim mean -> nats
    assert torch.allclose(r.leaf_log_density, traj, atol=1e-4)
    # each group's flow used its own prompt's translation c_g = (g, -g): x_0 = x_1 - c_g, so x_1 = x_0 + c_g
    g = torch.tensor([1.0, -2.0, 0.5]).repeat_interleave(5)
    x1 = r.leaves + torch.stack([g, -g], 1)
    expected = -0.5 * x1.double().pow(2).sum(1) - LOG_2PI
    assert torch.allclose(r.leaf_log_density, expected, atol=1e-4)
    rewards = torch.randn(15, generator=torch.Generator().manual_seed(1))
    marginal = SoftmaxTBObjective(policy_term="marginal").prepare(r, rewards, step=0)
    trajectory = SoftmaxTBObjective(policy_term="trajectory", log_prob_reduction="sum").prepare(r, rewards, step=0)
    assert torch.allclose(marginal.leaf_adv, trajectory.leaf_adv, atol=1e-4)
    assert {"marginal_p_entropy_frac", "marginal_logp_spread"} <= set(marginal.stats)


def test_a_rotation_agrees_only_in_the_limit_of_fine_sampler_steps():
    """A rotation preserves volume, but an Euler step of it scales |x|^2 by c = 1 + (omega h)^2: after N
    steps |x_0|^2 = c^N |x_1|^2. The flow's density is log N(R^-1 x_0) = log N(x_1) - (c^N - 1) |x_1|^2 / 2,
    so the marginal and the sampler's trajectory density differ by exactly that, which vanishes as N grows."""
    policy = AffineFieldPolicy(omega=2.0)
    ll = {"ode_steps": 16, "solver": "rk4", "exact": True}
    for steps in (6, 400):
        r = FlowSampler(PriorOnlyPlan(8), num_steps=steps, leaf_likelihood=ll).rollout(
            policy, ["0"], [{}], 0, 10, torch.Generator().manual_seed(0))
        traj = r.trajectory_log_prob_old().double() * 2
        x1_sq = -2 * (traj + LOG_2PI)  # log N(x_1) = -|x_1|^2 / 2 - log 2 pi
        gap = -0.5 * ((1 + (2.0 / steps) ** 2) ** steps - 1) * x1_sq
        assert torch.allclose(r.leaf_log_density - traj, gap, atol=1e-4)
        if steps == 6:
            assert gap.abs().max() > 0.5
        else:
            assert gap.abs().max() < 0.05


def test_leaves_are_unchanged_by_the_likelihood_and_it_is_reproducible(toy_policy):
    from tmpo.samplers import DynamicTreePlan

    plain = FlowSampler(DynamicTreePlan()).rollout(toy_policy, ["toy"] * 2, [{}] * 2, 0, 10, torch.Generator().manual_seed(5))
    with_ll = FlowSampler(DynamicTreePlan(), leaf_likelihood={"ode_steps": 4, "probes": 2, "exact": False})
    a = with_ll.rollout(toy_policy, ["toy"] * 2, [{}] * 2, 0, 10, torch.Generator().manual_seed(5))
    b = with_ll.rollout(toy_policy, ["toy"] * 2, [{}] * 2, 0, 10, torch.Generator().manual_seed(5))
    assert plain.leaf_log_density is None
    assert torch.equal(plain.leaves, a.leaves) and torch.equal(a.leaf_log_density, b.leaf_log_density)
    assert a.leaf_log_density.dtype == torch.float64 and torch.isfinite(a.leaf_log_density).all()
    assert a.info["leaf_likelihood_evals_per_leaf"] == 4 * 2 * 2


def test_marginal_without_the_sampler_option_names_it(toy_policy):
    from tmpo.samplers import DynamicTreePlan

    r = FlowSampler(DynamicTreePlan()).rollout(toy_policy, ["toy"], [{}], 0, 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"sampler\.leaf_likelihood.*method=tmpo_marginal"):
        SoftmaxTBObjective(policy_term="marginal").prepare(r, torch.zeros(27), step=0)
    with pytest.raises(ValueError, match="marginal_reduction"):
        SoftmaxTBObjective(policy_term="marginal", marginal_reduction="max")


def test_mean_reduction_divides_the_density_by_the_dimension(toy_policy):
    """``marginal_reduction=mean`` is the sum form at temperature d: advantages equal the sum form's on
    densities divided by d (here set by hand on the rollout)."""
    from tmpo.samplers import DynamicTreePlan

    r = FlowSampler(DynamicTreePlan()).rollout(toy_policy, ["toy"], [{}], 0, 10, torch.Generator().manual_seed(0))
    r.leaf_log_density = torch.linspace(-3.0, 1.0, 27, dtype=torch.float64)
    rewards = torch.linspace(0, 1, 27)
    mean = SoftmaxTBObjective(policy_term="marginal", marginal_reduction="mean").prepare(r, rewards, 0).leaf_adv
    q = torch.log_softmax(0.8 * rewards.double(), 0)
    p = torch.log_softmax(r.leaf_log_density / 2, 0)
    assert torch.allclose(mean.double(), q - p, atol=1e-5)


def test_two_iteration_toy_run_with_method_tmpo_marginal(tmp_path):
    cfg = compose_run(["method=tmpo_marginal", "trainer.total_steps=2", "trainer.prompts_per_step=2",
                       "eval.samples_per_prompt=200", "sampler.leaf_likelihood.ode_steps=8"], tmp_path)
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and summary["method"] == "tmpo_marginal"
    assert np.isfinite(summary["kl_to_target"])
    for r in train_rows:
        assert 0 < r["train/marginal_p_entropy_frac"] < 1 and r["train/marginal_logp_spread"] > 0
        assert r["train/leaf_likelihood_evals_per_leaf"] == 8 * 2 * 2  # heun: 2 stages, exact trace: d = 2 probes
        assert np.isfinite(r["train/loss"]) and r["train/optimizer_steps"] == 2
