"""The model's marginal log-density of a sample, ``log p_theta(x_0)``, by the probability-flow ODE.

A rectified-flow policy defines, through its velocity field, a deterministic map from noise to data
and with it an exact density of every point (Chen et al. 2018, "instantaneous change of variables";
Grathwohl et al. 2019, FFJORD, for the trace estimator). The Softmax-TB argument (paper App. A.2)
needs ``p_i = p_theta(x_i) / sum_j p_theta(x_j)`` of the *leaves*; this module computes that density.

Derivation (sign and boundary term). In tmpo's convention ``x_sigma = (1 - sigma) x_0 + sigma x_1``,
``x_1 ~ N(0, I)``, and the network predicts ``v = dx/dsigma`` (sampling integrates from sigma = 1 down
to 0). The marginals ``p_sigma`` of the ODE ``dx/dsigma = v(x, sigma)`` obey the continuity equation
``d_sigma p + div(p v) = 0``. Along one ODE trajectory ``x(sigma)``:

    d/dsigma log p_sigma(x(sigma)) = d_sigma log p + v . grad log p
                                   = -div(p v) / p + v . grad log p = -div v(x(sigma), sigma).

Integrating from sigma = 0 (the sample) to sigma = 1 (noise):

    log p_0(x_0) = log p_1(x_1) + int_0^1 div v(x(sigma), sigma) dsigma,
    log p_1(x_1) = log N(x_1; 0, I) = -||x_1||^2 / 2 - (d / 2) log(2 pi),

with ``x_1`` the end of the ODE started at ``x_0`` and run *forward* in sigma. The sign check: a field
that contracts towards the data (div v > 0 in sigma, i.e. volume grows towards the noise) makes the
data density higher than the noise density at the matched point. For the linear flow onto
``N(m, s^2 I)`` the integral is ``-d log s`` (``tests/test_likelihood.py`` checks this and a mixture).

Numerics. Fixed-step explicit Runge-Kutta (``euler``, ``heun``, ``rk4``) on the augmented state
``(x, int div)`` over a uniform sigma grid; state and accumulators in float64, the network in the
caller's dtype. ``div v = tr(dv/dx)`` is ``E[eps^T (dv/dx) eps]`` for probes with ``E[eps eps^T] = I``:
``exact=True`` uses the ``d`` standard basis vectors scaled by ``sqrt(d)`` (the exact trace, for small ``d`` such as the
2-D toy); otherwise ``probes`` Rademacher vectors (Hutchinson), drawn once per sample and kept for the
whole solve (FFJORD), so the estimate is unbiased for the *discretised* integral: the ODE path does not
depend on the probes, only the integrand does. Each stage is one forward of the ``P * n`` probe-copies
and one vector-Jacobian product; no parameter gradient is formed.

Cost per sample: ``ode_steps * stages * P`` velocity forwards (+ as many backwards), ``stages`` =
1 / 2 / 4 for euler / heun / rk4, ``P = d`` for the exact trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

# Butcher tableaux of the explicit fixed-step solvers: (a rows, b weights, c nodes)
SOLVERS: dict[str, tuple[tuple[tuple[float, ...], ...], tuple[float, ...], tuple[float, ...]]] = {
    "euler": ((), (1.0,), (0.0,)),
    "heun": (((1.0,),), (0.5, 0.5), (0.0, 1.0)),
    "rk4": (((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), (0.0, 0.5, 0.5, 1.0)),
}

EXACT_MAX_DIM = 16  # exact="auto": the exact trace up to this many dims (d probe-copies per solver stage)

# velocity(x [N, *S], sigma [N], rows [N]) -> v [N, *S]; ``rows`` index the caller's samples (so it can
# pick each probe-copy's prompt condition)
Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class LeafLikelihood:
    """Settings of the leaf log-density (``sampler.leaf_likelihood``).

    Args:
        ode_steps: uniform sigma steps from 0 to 1.
        probes: Rademacher probes per sample (Hutchinson); ignored when ``exact``.
        exact: ``true``: the exact trace with the ``d`` basis vectors (``d`` probe-copies per stage, small
            ``d`` only); ``false``: Hutchinson; ``"auto"``: exact when ``d <= EXACT_MAX_DIM`` (the 2-D toy),
            Hutchinson otherwise (images).
        solver: ``euler`` | ``heun`` | ``rk4``.
        chunk: samples per solve (memory bound; ``None`` = all at once).
    """

    ode_steps: int = 32
    probes: int = 1
    exact: bool | str = "auto"
    solver: str = "heun"
    chunk: int | None = None

    def __post_init__(self) -> None:
        bad = []
        if not (isinstance(self.ode_steps, int) and self.ode_steps >= 1):
            bad.append(f"ode_steps={self.ode_steps!r} (an integer >= 1)")
        if not (isinstance(self.probes, int) and self.probes >= 1):
            bad.append(f"probes={self.probes!r} (an integer >= 1)")
        if self.exact not in (True, False, "auto"):
            bad.append(f"exact={self.exact!r} (true, false or auto)")
        if self.solver not in SOLVERS:
            bad.append(f"solver={self.solver!r} (one of {', '.join(SOLVERS)})")
        if self.chunk is not None and not (isinstance(self.chunk, int) and self.chunk >= 1):
            bad.append(f"chunk={self.chunk!r} (an integer >= 1 or null)")
        if bad:
            raise ValueError("sampler.leaf_likelihood: invalid " + "; ".join(bad))

    @classmethod
    def from_config(cls, settings: Mapping) -> "LeafLikelihood":
        """From a config mapping; an unknown key is one error naming the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(valid))
        if unknown:
            raise ValueError(f"sampler.leaf_likelihood: unknown key(s) {unknown}; valid keys: {', '.join(valid)}")
        return cls(**dict(settings))

    def exact_for(self, dim: int) -> bool:
        """Whether the trace is exact for samples of ``dim`` dimensions."""
        return dim <= EXACT_MAX_DIM if self.exact == "auto" else bool(self.exact)

    def evaluations_per_sample(self, dim: int) -> int:
        """Velocity forwards (each with one backward) per sample."""
        return self.ode_steps * len(SOLVERS[self.solver][1]) * (dim if self.exact_for(dim) else self.probes)


@dataclass
class LogDensity:
    """``log_density = prior + divergence`` per sample, float64; ``x1`` the noise each sample maps to."""

    log_density: Tensor  # [n] log p_0(x_0), nats
    prior: Tensor  # [n] log N(x_1; 0, I)
    divergence: Tensor  # [n] int_0^1 div v dsigma (estimate)
    x1: Tensor  # [n, *S]


def standard_normal_log_density(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` summed over all non-batch dims, ``[n]``."""
    flat = x.flatten(1).double()
    return -0.5 * flat.pow(2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def make_probes(n: int, shape: tuple[int, ...], probes: int, exact: bool, generator: torch.Generator | None) -> Tensor:
    """``[P, n, *S]`` float64 probes with ``E[eps eps^T] = I``: ``sqrt(d)`` times the ``d`` basis vectors
    (exact: their mean of ``eps^T J eps`` is ``tr J``) or ``probes`` Rademacher draws."""
    d = math.prod(shape)
    if exact:
        basis = math.sqrt(d) * torch.eye(d, dtype=torch.float64)
        return basis[:, None, :].expand(d, n, d).reshape(d, n, *shape)
    signs = torch.randint(0, 2, (probes, n, *shape), generator=generator, dtype=torch.int64)
    return (2 * signs - 1).double()


def velocity_and_divergence(velocity: Velocity, x: Tensor, sigma: float, rows: Tensor, eps: Tensor,
                            dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``v(x, sigma)`` and the probe estimate of ``div v`` at ``x [n, *S]``: one forward of the ``P * n``
    probe-copies and one vector-Jacobian product. Returns ``(v [n, *S], div [n])`` in float64."""
    p, n = eps.shape[0], x.shape[0]
    with torch.enable_grad():
        xr = x.detach().to(dtype).repeat(p, *[1] * (x.dim() - 1)).requires_grad_(True)
        sig = torch.full((p * n,), float(sigma), dtype=dtype, device=x.device)
        v = velocity(xr, sig, rows.repeat(p))
        e = eps.reshape(p * n, *x.shape[1:]).to(v.device, v.dtype)
        (vjp,) = torch.autograd.grad((v * e).sum(), xr)
    div = (vjp.double() * e.double()).flatten(1).sum(1).view(p, n).mean(0)
    return v[:n].detach().double(), div


@torch.no_grad()
def _solve(velocity: Velocity, x0: Tensor, rows: Tensor, eps: Tensor, cfg: LeafLikelihood, dtype: torch.dtype) -> LogDensity:
    a, b, c = SOLVERS[cfg.solver]
    x = x0.detach().double()
    div_int = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    h = 1.0 / cfg.ode_steps
    for i in range(cfg.ode_steps):
        sigma = i * h
        ks: list[Tensor] = []
        ds: list[Tensor] = []
        for stage in range(len(b)):
            xs = x + h * sum(aij * k for aij, k in zip(a[stage - 1], ks)) if stage else x
            k, d = velocity_and_divergence(velocity, xs, sigma + c[stage] * h, rows, eps, dtype)
            ks.append(k)
            ds.append(d)
        x = x + h * sum(bi * k for bi, k in zip(b, ks))
        div_int = div_int + h * sum(bi * d for bi, d in zip(b, ds))
    prior = standard_normal_log_density(x)
    return LogDensity(log_density=prior + div_int, prior=prior, divergence=div_int, x1=x)


def log_density(velocity: Velocity, x0: Tensor, cfg: LeafLikelihood, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> LogDensity:
    """``log p_0(x_0)`` of each sample under the flow ``velocity`` (module docstring), in chunks of
    ``cfg.chunk`` samples. ``dtype`` is what the network is called in; ``generator`` draws the probes
    (on the CPU, so a seeded run draws the same probes on any device)."""
    n, shape = x0.shape[0], tuple(x0.shape[1:])
    eps = make_probes(n, shape, cfg.probes, cfg.exact_for(math.prod(shape)), generator).to(x0.device)
    size = n if cfg.chunk is None else cfg.chunk
    parts = []
    for start in range(0, n, size):
        rows = torch.arange(start, min(start + size, n), device=x0.device)
        parts.append(_solve(velocity, x0[rows], rows, eps[:, rows], cfg, dtype))
    return LogDensity(*(torch.cat([getattr(p, f) for p in parts]) for f in ("log_density", "prior", "divergence", "x1")))
