"""Stochastic transitions of a rectified-flow sampler and their Gaussian densities.

Pure tensor functions (torch only). Conventions: ``sigma`` is the flow-matching noise level
(``x_sigma = (1 - sigma) x0 + sigma x1``, ``sigma = 1`` is pure noise), a denoising step goes from
``sigma`` to ``sigma_next < sigma`` and ``dt = sigma_next - sigma < 0``. ``velocity`` is the model's
prediction of ``dx/dsigma = x1 - x0``.

Two noise types (TMPO paper App. C.1 writes the first, its experiments ran the second, see
``shared/specs/official-code-notes.md`` D3):

* ``"sde"`` -- the Flow-GRPO SDE step (paper eqs. 38-40). Eq. 40 writes ``gamma`` where the drift
  coefficient ``s = eta * sqrt(sigma / (1 - sigma))`` is meant; the noise std is ``s * sqrt(-dt)``
  (eq. 39).
* ``"cps"`` -- the coefficients-preserving step (Wang & Yu 2025): ``std = sigma_next * sin(eta*pi/2)``,
  ``mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat``.

Both reduce to the Euler ODE step ``x + v dt`` at ``eta = 0``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NOISE_TYPES = ("sde", "cps")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """``value`` (scalar or ``[B]``) as a ``[B, 1, ..., 1]`` tensor broadcastable against ``like``."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"sigma must be a scalar or a tensor of shape [{like.shape[0]}], got {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))


def sde_mean_std(
    x: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, eta: float, noise: str = "cps"
) -> tuple[Tensor, Tensor]:
    """Mean and std of the Gaussian transition ``p(x_next | x)`` (paper eqs. 38-40, or the CPS step).

    Args:
        x: current state ``[B, ...]``.
        velocity: predicted velocity at ``(x, sigma)``, same shape as ``x``.
        sigma, sigma_next: noise levels, scalars or ``[B]`` tensors, ``sigma_next < sigma``.
        eta: noise coefficient (0 gives the deterministic ODE step).
        noise: ``"sde"`` or ``"cps"``.

    Returns:
        ``(mean [B, ...], std [B])``.

    At ``sigma = 1`` the SDE coefficient ``sqrt(sigma / (1 - sigma))`` is infinite; like Flow-GRPO we
    use ``1 - sigma_next`` in the denominator for that step (the second sigma of the schedule).
    """
    if noise not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise!r}; valid options: {', '.join(NOISE_TYPES)}")
    s = _per_sample(sigma, x)
    s_next = _per_sample(sigma_next, x)
    if noise == "sde":
        dt = s_next - s
        one_minus = torch.where(s >= 1.0, 1.0 - s_next, 1.0 - s)
        coef = eta * torch.sqrt(s / one_minus)  # paper's gamma_i before the sqrt(-dt) factor
        mean = x * (1.0 + coef**2 / (2.0 * s) * dt) + velocity * (1.0 + coef**2 * (1.0 - s) / (2.0 * s)) * dt
        std = coef * torch.sqrt(-dt)
    else:
        std = s_next * math.sin(eta * math.pi / 2.0)
        x0_hat = x - s * velocity
        x1_hat = x + (1.0 - s) * velocity
        mean = (1.0 - s_next) * x0_hat + torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0)) * x1_hat
    return mean, std.reshape(x.shape[0])


def flow_sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    eta: float,
    noise: str = "cps",
    generator: torch.Generator | None = None,
    x_next: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One stochastic denoising step ``x_{sigma} -> x_{sigma_next}`` (paper eq. 38 / eq. 9).

    ``x_next = mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator``. When ``x_next`` is
    given it is returned unchanged instead of sampling: that is how a stored transition's mean is
    recomputed under new parameters.

    Returns:
        ``(x_next [B, ...], mean [B, ...], std [B])``.
    """
    mean, std = sde_mean_std(x, velocity, sigma, sigma_next, eta, noise)
    if x_next is None:
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_next = mean + std.view(-1, *([1] * (x.ndim - 1))) * eps
    return x_next, mean, std


def transition_log_prob(x_next: Tensor, mean: Tensor, std: float | Tensor) -> Tensor:
    """Gaussian log-density of a transition, averaged over all non-batch dims (paper eqs. 48-49).

    ``log N(x_next; mean, std^2 I) / d`` with ``d`` the number of latent dims. The paper claims the
    ``1/d`` scaling cancels everywhere; it does not cancel inside ``softmax(sum_t log pi)`` where it acts
    as a temperature on the within-group policy distribution (official-code-notes D4). We implement the
    paper's per-dim mean; objectives may rescale by ``d`` (``log_prob_reduction="sum"``).

    Returns:
        ``[B]`` per-sample log-density per dim.
    """
    std_b = _per_sample(std, x_next)
    if bool((std_b <= 0).any()):
        raise ValueError("transition_log_prob: std must be > 0; a zero-noise (ODE) step has no density")
    z = (x_next - mean) / std_b
    log_density = -0.5 * z**2 - torch.log(std_b) - _HALF_LOG_2PI
    return log_density.flatten(1).mean(dim=1)


def gaussian_kl_equal_std(mean_a: Tensor, mean_b: Tensor, std: float | Tensor) -> Tensor:
    """``KL(N(mean_a, std^2) || N(mean_b, std^2))`` per dim: ``||mean_a - mean_b||^2 / (2 std^2 d)``.

    This is Flow-GRPO's closed-form KL to the reference policy (averaged over dims, as its code does)
    and also the RatioNorm bias term of paper eqs. 31-32 on the same per-dim scale as
    :func:`transition_log_prob` (see :func:`ratio_norm_log_ratio`).

    Returns:
        ``[B]``.
    """
    std_b = _per_sample(std, mean_a)
    return ((mean_a - mean_b) ** 2 / (2.0 * std_b**2)).flatten(1).mean(dim=1)


def ratio_norm_log_ratio(log_prob_new: Tensor, log_prob_old: Tensor, mean_new: Tensor, mean_old: Tensor, std: Tensor) -> Tensor:
    """RatioNorm-centred per-step log importance ratio (paper App. B, eq. 32), per-dim scale.

    ``log w_hat = (log pi_theta - log pi_old) + ||mu_theta - mu_old||^2 / (2 std^2 d)``, where the bias
    term is detached so the gradient flows only through ``log pi_theta`` (App. B.1, last paragraph).
    Unscaled (no GRPO-Guard ``sigma sqrt(dt)`` rescaling); trajectory-level ratios sum these over steps.
    """
    bias = gaussian_kl_equal_std(mean_new.detach(), mean_old, std)
    return log_prob_new - log_prob_old + bias


KL_FORMS = ("exact", "flow_grpo")


def reference_kl(
    mean: Tensor, mean_ref: Tensor, std: Tensor, sigma: Tensor, sigma_next: Tensor, noise: str, form: str = "exact"
) -> Tensor:
    """Per-dim KL penalty of each transition to the reference policy's transition, ``[B]``.

    * ``"exact"``: ``KL(N(mean, std^2) || N(mean_ref, std^2)) / d = ||mean - mean_ref||^2 / (2 std^2 d)``,
      the true Gaussian KL of the stored step on the scale of :func:`transition_log_prob`.
    * ``"flow_grpo"``: the quantity Flow-GRPO's (and GARDO's) code penalises,
      ``||mean - mean_ref||^2 / (2 s^2 d)`` with ``s`` the std output of its step function: for ``"sde"``
      that is ``s_t = eta sqrt(sigma / (1 - sigma))`` *without* the ``sqrt(|dt|)`` of the noise std
      (``std = s_t sqrt(|dt|)``), so the penalty is ``|dt|`` times the exact KL (the maintainers say
      ``|dt|`` is absorbed into ``beta_KL``, flow_grpo issues #22/#78); for ``"cps"`` its std output is
      the true noise std ``sigma_next sin(eta pi / 2)``, so both forms coincide.

    ``beta_KL`` values of the baselines' papers (0.03, 0.04) are calibrated for their code's form.
    """
    if form not in KL_FORMS:
        raise ValueError(f"unknown KL form {form!r}; valid options: {', '.join(KL_FORMS)}")
    if noise not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise!r}; valid options: {', '.join(NOISE_TYPES)}")
    kl = gaussian_kl_equal_std(mean, mean_ref, std)
    if form == "flow_grpo" and noise == "sde":
        kl = kl * (torch.as_tensor(sigma, dtype=kl.dtype) - torch.as_tensor(sigma_next, dtype=kl.dtype)).abs()
    return kl
