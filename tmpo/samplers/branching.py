"""Curriculum-guided Beta branching schedule of the Dynamic Stochastic Tree Sampler (paper App. C.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def curriculum_mean(early: Sequence[float], late: Sequence[float], progress: float) -> np.ndarray:
    """Deterministic curriculum positions ``mu_i(p) = e_i + (l_i - e_i) p`` (paper eq. 41).

    ``progress`` is ``p = min(u / U, 1)``; values outside ``[0, 1]`` are clipped.
    """
    p = float(np.clip(progress, 0.0, 1.0))
    e, l = np.asarray(early, dtype=float), np.asarray(late, dtype=float)
    if e.shape != l.shape:
        raise ValueError(f"early {tuple(early)} and late {tuple(late)} positions must have the same length")
    return e + (l - e) * p


def resolve_positions(raw: Sequence[int], s_min: int, s_max: int) -> list[int]:
    """Sort positions and make them distinct inside ``[s_min, s_max]`` so that T stays fixed.

    Rule (the paper leaves it open; the public code drops duplicates and so often runs with T = 2,
    official-code-notes D10): sort, then walk left to right moving any position that is not after its
    predecessor to ``predecessor + 1``; if that pushes positions past ``s_max``, pack them down from
    ``s_max`` (walking right to left, each at most ``successor - 1``). The result is the strictly
    increasing sequence closest to the sorted draw in this sense; it needs
    ``s_max - s_min + 1 >= len(raw)``.
    """
    t = len(raw)
    if s_max - s_min + 1 < t:
        raise ValueError(f"cannot place {t} distinct branch points in steps [{s_min}, {s_max}]")
    pos = sorted(int(min(max(r, s_min), s_max)) for r in raw)
    for i in range(1, t):
        pos[i] = max(pos[i], pos[i - 1] + 1)
    pos[-1] = min(pos[-1], s_max)
    for i in range(t - 2, -1, -1):
        pos[i] = min(pos[i], pos[i + 1] - 1)
    return pos


def sample_branch_positions(
    early: Sequence[float],
    late: Sequence[float],
    progress: float,
    s_min: int,
    s_max: int,
    kappa: float,
    rng: np.random.Generator,
    mu_bar_margin: float = 0.05,
) -> list[int]:
    """Draw T sorted, distinct branch steps from the curriculum Beta schedule (paper eqs. 41-46).

    ``mu_bar = (mu - s_min) / (s_max - s_min)`` (eq. 42), ``xi ~ Beta(kappa mu_bar, kappa (1 - mu_bar))``
    (eq. 43), ``s = floor(s_min + (s_max - s_min) xi + 0.5)`` (eq. 46), then sorted and de-duplicated by
    :func:`resolve_positions`.

    Edge case the paper leaves open: a curriculum position at ``s_min`` (the default early and late
    first positions are both 1 = ``s_min``) gives ``mu_bar = 0`` and an undefined Beta. We clamp
    ``mu_bar`` into ``[margin, 1 - margin]`` (default 0.05): with ``kappa = 6`` that is
    ``Beta(0.3, 5.7)``, which rounds to ``s_min`` about 90% of the time, keeping the intent "the first
    branch sits at the first step" while leaving the draw well defined.
    """
    if s_max <= s_min:
        raise ValueError(f"s_max ({s_max}) must be greater than s_min ({s_min})")
    if kappa <= 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    mu = curriculum_mean(early, late, progress)
    mu_bar = np.clip((mu - s_min) / (s_max - s_min), mu_bar_margin, 1.0 - mu_bar_margin)
    xi = rng.beta(kappa * mu_bar, kappa * (1.0 - mu_bar))
    raw = np.floor(s_min + (s_max - s_min) * xi + 0.5).astype(int)
    return resolve_positions(raw.tolist(), s_min, s_max)
